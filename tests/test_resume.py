"""A run killed (SIGKILL, a real process) at several points resumes and ends bit-identical to an
uninterrupted run, with no duplicated or torn rows (issue: Fine-tuning engine, section 5)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from linft.runs.config import RunConfig
from linft.data.synthetic import make_image_tree
from linft.runs.store import RunDir, load_checkpoint

ARGS = ["--dataset", "PACS", "--backbone", "tiny_resnet", "--k", "2", "--resolution", "16", "--mode", "linear",
        "--p", "0.5", "--steps", "24", "--eval-every", "4", "--traj-start", "2", "--lr-decay-steps", "12",
        "--batch-size", "4", "--lr", "0.05", "--quiet", "true", "--checkpoint-every", "1"]


def _cli(root, data_root):
    return [sys.executable, "-m", "linft.cli", "train", "--root", str(root), "--data-root", str(data_root), *ARGS]


def _max_step(rows_path):
    if not rows_path.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in rows_path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


def _comparable(rows):
    return sorted(json.dumps(r, sort_keys=True) for r in rows if r.get("metric") != "img_per_s")


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path):
    data = tmp_path / "data"
    make_image_tree(data, "PACS", n_per_class=5, size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(ref_root, data), check=True, env=env, capture_output=True, timeout=300)
    cfg = RunConfig.from_dict({**json.loads(next(ref_root.iterdir()).joinpath("config.json").read_text())})
    rd = RunDir(root, cfg)
    kills = 0
    for target in (5, 11, 18):  # mid-interval, just after an evaluation, late
        proc = subprocess.Popen(_cli(root, data), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _max_step(rd.rows_path) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not rd.done
    assert kills >= 2, "the run finished before it could be killed"
    subprocess.run(_cli(root, data), check=True, env=env, capture_output=True, timeout=300)
    ref = RunDir(ref_root, cfg)
    assert rd.done and ref.done
    a, b = load_checkpoint(ref.final_path), load_checkpoint(rd.final_path)
    for key in a["trainable"]:
        assert torch.equal(a["trainable"][key], b["trainable"][key]), key
    for key in a["traj_avg"]:
        assert torch.equal(a["traj_avg"][key], b["traj_avg"][key]), key
    assert _comparable(ref.read_rows()) == _comparable(rd.read_rows())
    lines = rd.rows_path.read_text().splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
