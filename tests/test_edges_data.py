"""Edge cases of linft.data found by an audit: symlink chains in archives, a killed download's
leftovers, symlinked class folders, a stale or truncated feature cache."""
import fcntl
import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from linft.data.download import download, partial_folder, safe_extract
from linft.data.errors import DataError, DownloadError, UnsafeArchiveError

from test_data_download import pacs_zip, server  # noqa: F401  (fixture)


def _tar(path, entries):
    """entries: (name, kind, linkname, data)."""
    with tarfile.open(path, "w") as tf:
        for name, kind, link, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            if kind == tarfile.DIRTYPE:
                info.mode = 0o755
            tf.addfile(info, io.BytesIO(data))


SYM, REG = tarfile.SYMTYPE, tarfile.REGTYPE
CHAINS = {
    # the audit's chain: each link alone looks harmless until the one before it exists
    "audit": [("b", SYM, ".", b""), ("a", SYM, "b/b/b/../../../..", b""), ("a/outside/evil.txt", REG, "", b"evil")],
    # lexically inside ("." once b is ignored), outside once b -> . exists on disk
    "lexical": [("b", SYM, ".", b""), ("a", SYM, "b/..", b""), ("a/evil.txt", REG, "", b"evil")],
    # a file written through a symlink created earlier in the same archive
    "through": [("d", tarfile.DIRTYPE, "", b""), ("d/up", SYM, "..", b""), ("l", SYM, "d/up/..", b""),
                ("l/evil.txt", REG, "", b"evil")],
    # a link that is fine when written and points outside once a later link replaces a path it uses
    "retarget": [("c", tarfile.DIRTYPE, "", b""), ("x", SYM, "c/d/../..", b""), ("c/d", SYM, "..", b"")],
    # a hard link to a symlink would be a second symlink, relative to another folder
    "hard-to-sym": [("d", tarfile.DIRTYPE, "", b""), ("d/s", SYM, "../f", b""), ("t", tarfile.LNKTYPE, "d/s", b"")],
}


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "no-filters(py3.11.0-3.11.3)"])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_tar_symlink_chains_are_refused(tmp_path, monkeypatch, chain, filters):
    """Old code: 'lexical'/'through' wrote outside the folder without tarfile's data filter (Python
    3.11.0-3.11.3) and raised tarfile's own traceback with it; the audit chain raised a traceback."""
    if not filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    arch, dest = tmp_path / "evil.tar", tmp_path / "box" / "out"
    _tar(arch, CHAINS[chain])
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(arch, dest)
    assert not any(dest.rglob("*"))  # refused before anything was written
    assert not list((tmp_path / "box").rglob("evil.txt")) and not (tmp_path / "evil.txt").exists()


def test_tar_inner_symlink_chain_is_allowed(tmp_path):
    arch, dest = tmp_path / "ok.tar", tmp_path / "out"
    _tar(arch, [("d", tarfile.DIRTYPE, "", b""), ("d/e", tarfile.DIRTYPE, "", b""), ("d/e/up", SYM, "..", b""),
                ("l", SYM, "d/e/up", b""), ("l/f.txt", REG, "", b"ok")])
    safe_extract(arch, dest)
    assert (dest / "d" / "f.txt").read_bytes() == b"ok"


def test_zip_entry_through_an_earlier_archives_symlink_is_refused(tmp_path):
    """A later archive of the same download writing through a link the first one left."""
    dest = tmp_path / "box" / "out"
    _tar(tmp_path / "one.tar", [("b", SYM, ".", b""), ("d", tarfile.DIRTYPE, "", b"")])
    safe_extract(tmp_path / "one.tar", dest)
    os.symlink("../b/..", dest / "d" / "x")  # as if left by an older extraction
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("d/x/evil.txt", b"evil")
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(tmp_path / "two.zip", dest)
    assert not (dest / "ok.txt").exists() and not list((tmp_path / "box").rglob("evil.txt"))


def test_killed_download_leftovers_are_removed_by_the_next_one(tmp_path, server):  # noqa: F811
    """Old code: each download used a random ``.linft-download-*`` folder; a killed one stayed forever."""
    srv, url = server
    sha = pacs_zip(tmp_path, srv / "PACS.zip")
    root = tmp_path / "data"
    stale = partial_folder(root / "PACS")
    assert stale.parent == root and stale.name.startswith(".")
    (stale / "stage" / "kfold").mkdir(parents=True)  # what a download killed mid-extraction leaves
    (stale / "PACS.zip.part").write_bytes(b"half")
    download("PACS", root, base_url=url, sha256=[sha], log=lambda m: None)
    assert sorted(p.name for p in root.iterdir()) == ["PACS"]
    # a leftover found when the dataset is already complete is removed too
    (stale / "stage").mkdir(parents=True)
    download("PACS", root, base_url=url, sha256=[sha], log=lambda m: None)
    assert sorted(p.name for p in root.iterdir()) == ["PACS"]


def test_a_running_download_is_not_clobbered(tmp_path, server):  # noqa: F811
    srv, url = server
    sha = pacs_zip(tmp_path, srv / "PACS.zip")
    root = tmp_path / "data"
    work = partial_folder(root / "PACS")
    (work / "stage").mkdir(parents=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is downloading
        with pytest.raises(DownloadError, match="another `linft data download`"):
            download("PACS", root, base_url=url, sha256=[sha], log=lambda m: None)
        assert (work / "stage").is_dir()
    finally:
        os.close(fd)
    download("PACS", root, base_url=url, sha256=[sha], log=lambda m: None)
    assert sorted(p.name for p in root.iterdir()) == ["PACS"]


# ---- linft data check: symlinked class folders -------------------------------------------------

from linft.data.check import check_dataset  # noqa: E402
from linft.data.datasets import get_dataset  # noqa: E402
from linft.data.synthetic import make_image_tree  # noqa: E402

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")


@pytest.fixture
def pacs(tmp_path):
    make_image_tree(tmp_path / "root", "PACS", n_per_class=2, size=8, fmt="png")
    return tmp_path / "root"


@pytest.mark.parametrize("target", [".", "..", "dog", "OUTSIDE"])
def test_looping_or_outside_class_symlinks_are_refused(pacs, tmp_path, target):
    """Old code: ``loop -> .`` in every domain was accepted as a class holding the domain's images."""
    (tmp_path / "elsewhere").mkdir()
    for d in DOMAINS:
        os.symlink(tmp_path / "elsewhere" if target == "OUTSIDE" else target, pacs / "PACS" / d / "loop")
    rep = check_dataset("PACS", pacs)
    assert not rep.ok
    msg = [p for p in rep.problems if "'loop'" in p]
    assert len(msg) == len(DOMAINS) and "symlinked class folder" in msg[0], rep.problems
    assert "loop" not in rep.classes
    with pytest.raises(DataError, match="symlinked class folder"):
        get_dataset("PACS", pacs)


def test_class_symlink_to_another_domains_class_is_accepted(pacs):
    import shutil
    shutil.rmtree(pacs / "PACS" / "sketch" / "dog")
    os.symlink("../photo/dog", pacs / "PACS" / "sketch" / "dog")
    assert check_dataset("PACS", pacs).ok
