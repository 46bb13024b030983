"""``linft data download``: DomainBed's sources, checksummed, extracted safely, published atomically.

Steps for a dataset whose target is ``<root>/<folder>``:
1. each source is streamed into a temp file inside ``<root>/.linft-download-*/`` (same filesystem);
2. its checksum is verified (sha256 or md5 from :data:`SOURCES`, or ``--sha256``); a dataset
   with no known checksum is refused *before* downloading unless ``--no-verify`` is given, in
   which case the computed sha256 is printed and recorded in the completion marker;
3. archives are extracted into the temp folder by :func:`safe_extract`, which refuses entries that
   would land outside it (absolute paths, ``..``, links pointing outside, devices);
4. the completion marker ``.linft-complete`` is written *inside* the staged folder, which is then
   renamed into place: a dataset folder is either absent or complete.

``base_url`` (argument or ``$LINFT_DATA_BASE_URL``) replaces every source URL by
``<base_url>/<file name>``: a mirror, or a loopback server in tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from linft.data.errors import ChecksumError, DownloadError, UnsafeArchiveError
from linft.data.mnist import MNIST_MD5, OPTDIGITS_SHA256

MARKER = ".linft-complete"
BASE_URL_ENV = "LINFT_DATA_BASE_URL"


def gdrive(file_id: str) -> str:
    # drive.usercontent serves large files directly with confirm=t (no virus-scan interstitial).
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = True


@dataclass(frozen=True)
class Download:
    """``folder``: target under the root; ``inner``: the folder inside the extracted archive(s) that
    becomes the target (None: the extraction folder itself)."""

    folder: str
    sources: tuple[Source, ...]
    inner: str | None = None


_VISDA = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/optdigits/"
SOURCES = {  # URLs from DomainBed's scripts/download.py; checksums only where canonical ones exist
    "PACS": Download("PACS", (Source(gdrive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), "PACS.zip"),), inner="kfold"),
    "VLCS": Download("VLCS", (Source(gdrive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), "VLCS.tar.gz"),), inner="VLCS"),
    "OfficeHome": Download("office_home", (Source(gdrive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), "office_home.zip"),),
                           inner="OfficeHomeDataset_10072016"),
    "DomainNet": Download("domain_net", tuple(Source(_VISDA + p, p.split("/")[-1]) for p in [
        "groundtruth/clipart.zip", "infograph.zip", "groundtruth/painting.zip", "quickdraw.zip",
        "real.zip", "sketch.zip"])),
    "MNIST": Download("MNIST/raw", tuple(Source(_MNIST + f"{n}.gz", f"{n}.gz", md5=m[0], extract=False)
                                         for n, m in MNIST_MD5.items())),
    "optdigits": Download("optdigits", tuple(Source(_UCI + n, n, sha256=s, extract=False)
                                             for n, s in OPTDIGITS_SHA256.items())),
}
ALIASES = {"RotatedMNIST": "MNIST", "ColoredMNIST": "MNIST"}
UNSUPPORTED = {
    "TerraIncognita": "TerraIncognita is rebuilt from the Caltech Camera Traps images and annotations "
                      "(several GB); use DomainBed's domainbed/scripts/download.py, then `linft data check`",
    "Digits": "Digits needs MNIST and optdigits: run `linft data download MNIST` and `linft data download optdigits`",
}


def _fetch(url: str, dest: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """Stream ``url`` into ``dest``; returns ``(sha256, md5)`` of the bytes."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            while block := r.read(chunk):
                f.write(block)
                sha.update(block)
                md5.update(block)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot download {url}: {e}") from e
    return sha.hexdigest(), md5.hexdigest()


def _inside(dest: Path, rel: str) -> bool:
    real, base = os.path.realpath(dest / rel), os.path.realpath(dest)
    return real == base or real.startswith(base + os.sep)


def _check_name(archive: Path, name: str) -> str:
    name = name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchiveError(f"{archive.name}: refusing entry {name!r} (absolute path or '..' escapes the target)")
    return name


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest``, refusing any entry that would land
    outside it: absolute names, ``..`` components, symlinks or hard links whose target resolves
    outside ``dest``, and device or fifo entries. Every entry is checked before anything is written."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = _check_name(archive, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink entry
                    target = zf.read(info).decode("utf-8", "replace")
                    if target.startswith("/") or not _inside(dest, str(PurePosixPath(name).parent / target)):
                        raise UnsafeArchiveError(f"{archive.name}: refusing symlink {name!r} -> {target!r} "
                                                 f"pointing outside the target")
                if not _inside(dest, name):
                    raise UnsafeArchiveError(f"{archive.name}: refusing entry {name!r} outside the target")
            zf.extractall(dest)  # zipfile writes symlink entries as plain files
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DownloadError(f"{archive.name} is neither a zip nor a tar archive: {e}") from e
    with tf:
        for m in tf.getmembers():
            name = _check_name(archive, m.name)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchiveError(f"{archive.name}: refusing special entry {name!r} (device or fifo)")
            if m.issym() or m.islnk():
                link = m.linkname.replace("\\", "/")
                rel = str(PurePosixPath(name).parent / link) if m.issym() else link
                if link.startswith("/") or not _inside(dest, rel):
                    raise UnsafeArchiveError(f"{archive.name}: refusing link {name!r} -> {m.linkname!r} "
                                             f"pointing outside the target")
            if not _inside(dest, name):
                raise UnsafeArchiveError(f"{archive.name}: refusing entry {name!r} outside the target")
        # The 'data' filter (Python >= 3.11.4) re-checks all of the above and drops set-uid bits.
        tf.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(dest)


def _parse_sha256(values: list[str] | None, sources) -> dict[str, str]:
    """``--sha256 HEX`` (single-source datasets) or ``--sha256 FILE=HEX`` (any) -> ``{file: hex}``."""
    out = {}
    for v in values or []:
        fname, _, hexd = v.rpartition("=")
        if not fname:
            if len(sources) != 1:
                raise DownloadError(f"this dataset has {len(sources)} files; pass --sha256 FILE=HEX for each")
            fname = sources[0].filename
        if fname not in {s.filename for s in sources}:
            raise DownloadError(f"--sha256 names {fname!r}, not one of {[s.filename for s in sources]}")
        out[fname] = hexd.lower().strip()
    return out


def download(name: str, root: str | os.PathLike, *, base_url: str | None = None, sha256: list[str] | None = None,
             no_verify: bool = False, log=print) -> Path:
    """Download dataset ``name`` into ``root`` (see the module docstring); returns the target folder."""
    if name in UNSUPPORTED:
        raise DownloadError(UNSUPPORTED[name])
    name = ALIASES.get(name, name)
    if name not in SOURCES:
        raise DownloadError(f"no download for {name!r}; choose one of: {', '.join(list(SOURCES) + list(ALIASES))}")
    spec = SOURCES[name]
    given = _parse_sha256(sha256, spec.sources)
    unknown = [s.filename for s in spec.sources if not (s.sha256 or s.md5 or s.filename in given)]
    if unknown and not no_verify:
        raise DownloadError(f"no known checksum for {', '.join(unknown)}: pass --sha256 HEX if you have one, or "
                            f"--no-verify to download anyway (the computed sha256 is printed and recorded "
                            f"in {spec.folder}/{MARKER})")
    root = Path(root).expanduser()
    target = root / spec.folder
    if (target / MARKER).is_file():
        log(f"{name}: already complete in {target}")
        return target
    if target.exists():
        raise DownloadError(f"{target} exists but was not completed by `linft data download` (no {MARKER}); "
                            f"remove or move it to download again, or use it as is")
    target.parent.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    work = Path(tempfile.mkdtemp(prefix=".linft-download-", dir=target.parent))
    try:
        stage = work / "stage"
        stage.mkdir()
        record = []
        for src in spec.sources:
            url = f"{base_url.rstrip('/')}/{src.filename}" if base_url else src.url
            part = work / (src.filename + ".part")
            log(f"{name}: downloading {url}")
            got_sha, got_md5 = _fetch(url, part)
            want_sha = given.get(src.filename, src.sha256)
            if want_sha and got_sha != want_sha:
                raise ChecksumError(f"{src.filename} from {url} has sha256 {got_sha}, expected {want_sha}; "
                                    f"nothing was installed")
            if src.md5 and not want_sha and got_md5 != src.md5:
                raise ChecksumError(f"{src.filename} from {url} has md5 {got_md5}, expected {src.md5}; "
                                    f"nothing was installed")
            verified = bool(want_sha or src.md5)
            if not verified:
                log(f"{name}: {src.filename} NOT verified (--no-verify); sha256 {got_sha}")
            if src.extract:
                safe_extract(part, stage)
                part.unlink()
            else:
                os.replace(part, stage / src.filename)
            record.append({"file": src.filename, "url": url, "sha256": got_sha, "md5": got_md5, "verified": verified})
        built = stage / spec.inner if spec.inner else stage
        if not built.is_dir():
            raise DownloadError(f"the {name} archive holds no folder {spec.inner!r}; nothing was installed")
        (built / MARKER).write_text(json.dumps({"dataset": name, "files": record,
                                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        try:
            os.rename(built, target)
        except OSError as e:
            raise DownloadError(f"cannot move the download into {target}: {e}") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: complete in {target}")
    return target
