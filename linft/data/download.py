"""``linft data download``: DomainBed's sources, checksummed, extracted safely, published atomically.

Steps for a dataset whose target is ``<root>/<folder>``:
1. each source is streamed into a temp file inside ``<target>/../.linft-partial-<name>/`` (same
   filesystem, a fixed name: what a killed download leaves is removed by the next one, which
   refuses to start while another process holds that folder's lock);
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

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tarfile
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


def _check_name(archive: Path, name: str) -> str:
    name = name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchiveError(f"{archive.name}: refusing entry {name!r} (absolute path or '..' escapes the target)")
    return name


_MAX_HOPS = 64  # symlinks followed while resolving one path (the kernel's limit is 40)


class _Escape(Exception):
    """A path that resolves outside the extraction folder (or cannot be resolved safely)."""


def _disk_link(base: str, key: str) -> str | None:
    """The target of ``base/key`` if it is a symlink on disk, None if it is anything else or absent."""
    try:
        st = os.lstat(os.path.join(base, key))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # ENAMETOOLONG, ELOOP...: refuse rather than guess (the CVE-2025-4517 trick)
        raise _Escape(str(e)) from e
    return os.readlink(os.path.join(base, key)) if stat.S_ISLNK(st.st_mode) else None


def _resolve(base: str, rel: str, links: dict[str, str], follow_last: bool = True) -> list[str]:
    """Where ``rel`` lands, as components under ``base`` (a real path), following symlinks as the
    kernel would: those in ``links`` (created by earlier members, not written yet) and those on disk.
    Raises :class:`_Escape` if any step leaves ``base`` (``..`` above it, an absolute target)."""
    todo = rel.replace("\\", "/").split("/")[::-1]
    out: list[str] = []
    hops = 0
    while todo:
        c = todo.pop()
        if c in ("", "."):
            continue
        if c == "..":
            if not out:
                raise _Escape(rel)
            out.pop()
            continue
        key = "/".join(out + [c])
        target = (links[key] if key in links else _disk_link(base, key)) if (todo or follow_last) else None
        if target is None:
            out.append(c)
            continue
        hops += 1
        target = target.replace("\\", "/")
        if hops > _MAX_HOPS or target.startswith("/") or (len(target) > 1 and target[1] == ":"):
            raise _Escape(rel)
        todo.extend(target.split("/")[::-1])
    return out


class _Guard:
    """Checks each archive member against the folder's state as members are written in order
    (symlinks created by earlier members included), whatever tarfile's own filters do."""

    def __init__(self, archive: Path, dest: Path):
        self.archive, self.base = archive, os.path.realpath(dest)
        self.links: dict[str, str] = {}  # resolved location -> target, for links not yet on disk

    def refuse(self, name: str, why: str):
        return UnsafeArchiveError(f"{self.archive.name}: refusing entry {name!r} ({why})")

    def where(self, name: str, follow_last: bool) -> list[str]:
        try:
            return _resolve(self.base, name, self.links, follow_last)
        except _Escape:
            raise self.refuse(name, "it resolves outside the target, through '..' or symlinks") from None

    def entry(self, name: str, symlink: str | None = None, hardlink: str | None = None) -> None:
        parent = self.where(name, follow_last=False)[:-1]  # where the entry itself is created
        self.where(name, follow_last=True)  # where writing to it lands (an existing symlink is followed)
        if symlink is not None:
            try:
                _resolve(self.base, "/".join(parent + [symlink]), self.links)
            except _Escape:
                raise self.refuse(name, f"symlink to {symlink!r} pointing outside the target") from None
            self.links["/".join(parent + [PurePosixPath(name).name])] = symlink
        if hardlink is not None:
            try:
                at = _resolve(self.base, hardlink, self.links, follow_last=False)
                _resolve(self.base, hardlink, self.links)
            except _Escape:
                raise self.refuse(name, f"hard link to {hardlink!r} pointing outside the target") from None
            key = "/".join(at)
            if key in self.links or _disk_link(self.base, key) is not None:
                raise self.refuse(name, f"hard link to the symlink {hardlink!r}")

    def final_links(self) -> None:
        """Every symlink, resolved in the final tree, still lands inside (a later member may have
        replaced a path an earlier link goes through)."""
        for key, target in self.links.items():
            try:
                _resolve(self.base, "/".join(key.split("/")[:-1] + [target]), self.links)
            except _Escape:
                raise self.refuse(key, f"symlink to {target!r} resolves outside the target once "
                                       f"the whole archive is extracted") from None


def _zip_entries(archive: Path, zf: zipfile.ZipFile):
    out = []
    for info in zf.infolist():
        name = _check_name(archive, info.filename)
        link = None
        if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink entry (written as a plain file)
            link = zf.read(info).decode("utf-8", "replace")
        out.append((info, name, link))
    return out


def _tar_entry(archive: Path, m: tarfile.TarInfo):
    name = _check_name(archive, m.name)
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeArchiveError(f"{archive.name}: refusing special entry {name!r} (device or fifo)")
    link = m.linkname.replace("\\", "/")
    return name, (link if m.issym() else None), (link if m.islnk() else None)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest``, refusing any entry that would land
    outside it: absolute names, ``..`` components, symlinks or hard links whose target resolves
    outside ``dest``, entries whose path resolves outside through symlinks created by earlier
    entries (or already in ``dest``), and device or fifo entries. Every entry is checked, in
    order, before anything is written; each is checked again against the disk just before it is
    written (whatever tarfile's filters do; Python 3.11.0-3.11.3 have none)."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            entries = _zip_entries(archive, zf)
            guard = _Guard(archive, dest)
            for _, name, link in entries:
                guard.entry(name)  # zipfile writes a symlink entry as a plain file: its path is what matters
                if link is not None:
                    try:
                        _resolve(guard.base, str(PurePosixPath(name).parent / link), {})
                    except _Escape:
                        raise guard.refuse(name, f"symlink to {link!r} pointing outside the target") from None

            def checked():
                g = _Guard(archive, dest)
                for info, name, _ in entries:
                    g.entry(name)
                    yield info
            zf.extractall(dest, members=checked())
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise DownloadError(f"{archive.name} is neither a zip nor a tar archive: {e}") from e
    filter_error = getattr(tarfile, "FilterError", ())
    with tf:
        try:
            members = tf.getmembers()
        except tarfile.TarError as e:
            raise DownloadError(f"{archive.name} is not a readable tar archive: {e}") from e
        guard = _Guard(archive, dest)
        for m in members:
            guard.entry(*_tar_entry(archive, m))
        guard.final_links()

        def checked():  # consumed one member at a time, after the previous ones are written
            g = _Guard(archive, dest)
            for m in members:
                name, sym, hard = _tar_entry(archive, m)
                g.links.clear()  # the disk now holds every earlier link
                g.entry(name, sym, hard)
                yield m
        try:
            # The 'data' filter (Python >= 3.11.4) also drops set-uid bits and odd permissions.
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=checked(), filter="data")
            else:
                tf.extractall(dest, members=checked())
        except filter_error as e:
            raise UnsafeArchiveError(f"{archive.name}: refusing entry ({e})") from e
        except tarfile.TarError as e:
            raise DownloadError(f"cannot extract {archive.name}: {e}") from e


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
        _run_download(name, spec, target, work, base_url, given, log)
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


def _run_download(name, spec, target, work, base_url, given, log) -> None:
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
