"""Slurm launcher (issue #8, part 1), on CPU with submitit's local executor: a sweep as a job array,
one job cancelled mid-run and one preempted (SIGUSR2: submitit's checkpoint/requeue protocol),
then a relaunch; every run ends done with the weights and rows of a sequential sweep."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from linft.data.synthetic import make_image_tree
from linft.runs.store import RunDir, load_checkpoint, run_state
from linft.sweeps.grid import load_experiment, status
from linft.training.launch import train

submitit = pytest.importorskip("submitit")
from linft.sweeps.slurm import SlurmOptions, launch_slurm, make_executor  # noqa: E402

GRID = """
name = "tiny"
[base]
dataset = "PACS"
backbone = "tiny_resnet"
k = 2
resolution = 16
p = 0.5
steps = 12
eval_every = 4
traj_start = 2
lr_decay_steps = [8]
batch_size = 4
lr = 0.05
[grid]
cases = [{mode = "tail", steps = 48}, {mode = "linear", steps = 48}, {mode = "full"}]
"""


def _max_step(rows_path: Path) -> int:
    if not rows_path.exists():
        return -1
    return max((json.loads(x).get("step", -1) for x in rows_path.read_text().splitlines() if x.endswith("}")),
               default=-1)


def _wait_for(cond, timeout=90.0):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def _children(pid: int) -> list[int]:
    p = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def test_sbatch_script_carries_the_resources(tmp_path, monkeypatch):
    monkeypatch.setattr("linft.sweeps.slurm._has_sbatch", lambda: True)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    opts = SlurmOptions(partition="gpu", gpus_per_job=2, cpus_per_job=6, mem_gb=40, time_min=90,
                        array_parallelism=3, extra=(("account", "abc"),))
    text = make_executor(tmp_path, opts)._executor._make_submission_file_text("CMD", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=6", "--mem=40GB", "--time=90",
                 "--signal=USR2@120", "--account=abc", "--open-mode=append"):
        assert f"#SBATCH {line}" in text, line


@pytest.fixture
def sigint_default():
    """submitit's local executor cancels a job with SIGINT; a test run started in the background of a
    script inherits SIGINT ignored (and so would its jobs), so give the jobs a terminal's disposition."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_local_executor_sweep_survives_cancel_and_preemption(tmp_path, monkeypatch, sigint_default):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # jobs bit-identical to the in-process reference
    data = tmp_path / "data"
    make_image_tree(data, "PACS", n_per_class=5, size=16)
    (tmp_path / "tiny.toml").write_text(GRID)
    exp = load_experiment(str(tmp_path / "tiny.toml"), data_root=str(data), checkpoint_every=1)
    root = tmp_path / "runs"
    opts = SlurmOptions(cluster="local", time_min=10)
    jobs = launch_slurm(exp, root, opts)
    assert len(jobs) == 3
    cancelled, preempted = exp.configs[0], exp.configs[1]
    by_id = dict(zip([c.run_id for c in exp.configs], jobs))
    for cfg in (cancelled, preempted):
        rows = RunDir(root, cfg).rows_path
        assert _wait_for(lambda: _max_step(rows) >= 4), f"{cfg.run_id} shows no progress"
    # preemption: SIGUSR2 to the job's task -> TrainRun.checkpoint() -> requeued -> resumes
    task = _children(by_id[preempted.run_id]._process.pid)
    assert task
    os.kill(task[0], signal.SIGUSR2)
    by_id[cancelled.run_id].cancel()  # scancel: the run stays interrupted until relaunched
    for job in jobs:
        job.wait()
    assert run_state(root / cancelled.run_id) == "running"
    assert run_state(root / preempted.run_id) == "done"
    log = (root / preempted.run_id / "slurm.err").read_text()
    assert "preempted" in log or "timed-out" in log
    assert len(status(exp, root)["done"]) == 2
    # relaunch: only the interrupted run is submitted, and it resumes
    again = launch_slurm(exp, root, opts)
    assert len(again) == 1
    assert again[0].result() == "done"
    assert len(status(exp, root)["done"]) == 3
    # the same as a sequential sweep
    for cfg in exp.configs:
        ref, got = train(cfg, tmp_path / "seq"), RunDir(root, cfg)
        a, b = load_checkpoint(ref.final_path), load_checkpoint(got.final_path)
        for part in a:
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (cfg.mode, part, k)
        keep = lambda rows: [r for r in rows if r.get("metric") != "img_per_s"]  # noqa: E731
        assert keep(ref.read_rows()) == keep(got.read_rows()), cfg.mode
        assert (got.path / "slurm.out").is_symlink()
