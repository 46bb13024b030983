"""``linft data download``: DomainBed's sources, checksummed, extracted safely, published atomically.

Steps for a dataset whose target is ``<root>/<folder>``:
1. each source is streamed into a temp file inside ``<target>/../.linft-partial-<name>/`` (same
   filesystem, a fixed name: what a killed download leaves is removed by the next one, which
   refuses to start while another process holds that folder's lock);
2. its checksum is verified (sha256 or md5 from :data:`SOURCES`, or ``--sha256``). A file with no
   published checksum (no DomainBed archive has one) is trusted on first use: its sha256 is
   computed, printed and recorded in ``<root>/.linft-checksums.json``, and every later download of
   it into that root is verified against the record; ``--no-verify`` skips verification altogether;
3. archives are extracted into the temp folder by :func:`safe_extract`, which refuses entries that
   would land outside it (absolute paths, ``..``, links pointing outside, devices);
4. the completion marker ``.linft-complete`` is written *inside* the staged folder, which is then
   renamed into place: a dataset folder is either absent or complete.

``base_url`` (argument or ``$LINFT_DATA_BASE_URL``) replaces every source URL by
``<base_url>/<file name>``: a mirror, or a loopback server in tests.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from linft.data.archives import safe_extract  # noqa: F401 (tests and callers import it from here)
from linft.data.errors import ChecksumError, DownloadError
from linft.data.mnist import MNIST_MD5, OPTDIGITS_SHA256

MARKER = ".linft-complete"
RECORD = ".linft-checksums.json"   # sha256 of files with no published checksum, recorded at first download
FIRST_USE = "first-use"            # placeholder: record this file's sha256 (trust on first use)
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
    root = Path(root).expanduser()
    if not no_verify:
        recorded = _read_record(root).get(name, {})
        for s in spec.sources:
            if not (s.sha256 or s.md5 or s.filename in given):
                if s.filename in recorded:
                    given[s.filename] = recorded[s.filename]
                    log(f"{name}: {s.filename} has no published checksum; verifying it against the sha256 "
                        f"recorded at its first download ({root / RECORD})")
                else:
                    given[s.filename] = FIRST_USE
                    log(f"{name}: {s.filename} has no published checksum; its sha256 is recorded on this first "
                        f"download ({root / RECORD}) and later downloads are verified against it")
    target = root / spec.folder
    if (target / MARKER).is_file():
        if partial_folder(target).exists():  # a killed download's leftovers (one still running is left alone)
            with contextlib.suppress(DownloadError), _partial(target):
                pass
        log(f"{name}: already complete in {target}")
        return target
    if target.exists():
        raise DownloadError(f"{target} exists but was not completed by `linft data download` (no {MARKER}); "
                            f"remove or move it to download again, or use it as is")
    target.parent.mkdir(parents=True, exist_ok=True)
    base_url = base_url or os.environ.get(BASE_URL_ENV)
    with _partial(target) as work:
        if (target / MARKER).is_file():  # another process completed it while we checked
            log(f"{name}: already complete in {target}")
            return target
        first_use = _run_download(name, spec, target, work, base_url, given, log)
    if first_use:
        _write_record(root, name, first_use)
    log(f"{name}: complete in {target}")
    return target


def partial_folder(target: Path) -> Path:
    """The work folder of a download of ``target``: a fixed name beside it (same filesystem), so that
    what a killed download leaves is found and removed by the next one."""
    return target.parent / f".linft-partial-{target.name}"


@contextlib.contextmanager
def _partial(target: Path):
    """The empty work folder :func:`partial_folder` for this download, removed on exit. Leftovers of a
    killed download are removed first; a download still running (it holds a lock on the folder) is
    refused rather than clobbered."""
    work = partial_folder(target)
    work.mkdir(exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by close(), also when killed
        except BlockingIOError:
            raise DownloadError(f"another `linft data download` is writing {work}; wait for it to finish") from None
        for child in work.iterdir():  # a killed download's leftovers
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        os.close(fd)


def _run_download(name, spec, target, work, base_url, given, log) -> dict[str, str]:
    """Fetch, verify, extract and publish; returns ``{file: sha256}`` of first-use files."""
    stage = work / "stage"
    stage.mkdir()
    record, first_use = [], {}
    for src in spec.sources:
        url = f"{base_url.rstrip('/')}/{src.filename}" if base_url else src.url
        part = work / (src.filename + ".part")
        log(f"{name}: downloading {url}")
        got_sha, got_md5 = _fetch(url, part)
        want_sha = given.get(src.filename, src.sha256)
        if want_sha == FIRST_USE:
            want_sha, first_use[src.filename] = None, got_sha
        if want_sha and got_sha != want_sha:
            raise ChecksumError(f"{src.filename} from {url} has sha256 {got_sha}, expected {want_sha}; "
                                f"nothing was installed")
        if src.md5 and not want_sha and got_md5 != src.md5:
            raise ChecksumError(f"{src.filename} from {url} has md5 {got_md5}, expected {src.md5}; "
                                f"nothing was installed")
        verified = bool(want_sha or src.md5) or ("first use" if src.filename in first_use else False)
        if src.filename in first_use:
            log(f"{name}: {src.filename} sha256 {got_sha} (first download: recorded, not verified)")
        elif not verified:
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
    return first_use


def _read_record(root: Path) -> dict:
    """``{dataset: {file: sha256}}`` recorded at first downloads into ``root`` ({} if none)."""
    path = root / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise DownloadError(f"{path} is damaged ({e}); restore or delete it (it only records checksums)") from None


def _write_record(root: Path, name: str, shas: dict[str, str]) -> None:
    record = _read_record(root)
    record.setdefault(name, {}).update(shas)
    tmp = root / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / RECORD)
