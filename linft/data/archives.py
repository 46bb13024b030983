"""Safe extraction of downloaded archives (:func:`safe_extract`): every tar or zip member, and every
link target, is resolved in order through the links that earlier members create and those already on
disk, and anything that would land outside the target folder is refused before it is written."""
from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from linft.data.errors import DownloadError, UnsafeArchiveError


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
