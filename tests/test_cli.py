"""Bad input at the command line: one readable line, exit status 2, no traceback."""
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "linft.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["inspect", "vit"], "unknown backbone 'vit'"),
    (["inspect", "tiny_resnet", "--k", "9"], "k must be an integer in [0, 6]"),
    (["inspect", "tiny_resnet", "--p", "1.0"], "dropout rate must lie in [0, 1)"),
    (["inspect", "resnet50.random", "--weights-file", "/nonexistent.pth"], "does not exist"),
])
def test_bad_input_gives_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wrong_architecture_checkpoint(tmp_path):
    import torch
    import torchvision
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    r = run_cli("inspect", "resnet50.random", "--weights-file", str(path))
    assert r.returncode == 2 and "missing keys" in r.stderr and "Traceback" not in r.stderr


def test_inspect_checks_exactness():
    r = run_cli("inspect", "tiny_resnet", "--k", "2", "--resolution", "16")
    assert r.returncode == 0, r.stderr
    assert '"taylor_gap_at_theta0": 0.0' in r.stdout
