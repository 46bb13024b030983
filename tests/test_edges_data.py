"""Edge cases of linft.data found by an audit: symlink chains in archives, a killed download's
leftovers, symlinked class folders, a stale or truncated feature cache."""
import fcntl
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


# ---- feature cache: images replaced in place, truncated features --------------------------------

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402

from linft.data.feature_cache import FeatureCache  # noqa: E402

MEAN, STD, RES = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 16


def _trunk():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()


def _key(env):
    return {"backbone": "toy", "weights": "w0", "split": "k=1", "dataset": "PACS", "domain": env.name,
            "resolution": RES}


def _features_of(env, i, trunk):
    from linft.data.transforms import eval_transform
    with torch.no_grad():
        return trunk(eval_transform(MEAN, STD, RES)(env.load(i))[None])[0].numpy()


def test_image_replaced_in_place_rebuilds_the_cache(pacs, tmp_path):
    """Old code: the key covered names and labels only; the old image's features were served."""
    cache, trunk = FeatureCache(tmp_path / "cache"), _trunk()
    env = get_dataset("PACS", pacs)["A"]
    first = cache.get(trunk, _key(env), env, MEAN, STD)
    path = env.samples[0][0]
    old = os.stat(path)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    Image.fromarray(255 - pixels).save(path)  # same name, size in pixels, label
    if os.stat(path).st_mtime_ns == old.st_mtime_ns:  # a coarse filesystem clock: what a later write would see
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    env = get_dataset("PACS", pacs)["A"]  # same names, same labels
    again = cache.get(trunk, _key(env), env, MEAN, STD)
    assert again.built and again.path != first.path
    assert np.allclose(np.asarray(again.features[0]), _features_of(env, 0, trunk), atol=1e-5)
    assert not np.allclose(np.asarray(again.features[0]), np.asarray(first.features[0]), atol=1e-3)
    # untouched files keep the key
    assert not cache.get(trunk, _key(env), env, MEAN, STD).built


def test_truncated_features_are_rebuilt(pacs, tmp_path):
    """Old code: np.load(mmap_mode='r') of a truncated features.npy raised (ValueError from mmap)."""
    cache, trunk = FeatureCache(tmp_path / "cache"), _trunk()
    env = get_dataset("PACS", pacs)["A"]
    first = cache.get(trunk, _key(env), env, MEAN, STD)
    want = np.array(first.features)
    f = first.path / "features.npy"
    size = f.stat().st_size
    del first
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    again = cache.get(trunk, _key(env), env, MEAN, STD)
    assert again.built and np.array_equal(np.array(again.features), want)
    (again.path / "labels.npy").write_bytes(b"\x93NUMPY garbage")
    assert cache.get(trunk, _key(env), env, MEAN, STD).built


def test_in_memory_environment_key_covers_pixels(tmp_path):
    from linft.data.environments import TensorEnvironment
    cache, trunk = FeatureCache(tmp_path / "cache"), _trunk()
    imgs = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = TensorEnvironment("A", imgs, [0, 1, 0, 1])
    b = TensorEnvironment("A", imgs.flip(0).contiguous(), [0, 1, 0, 1])
    assert cache.digest(_key(a), a) != cache.digest(_key(b), b)
