"""Runs under faults a careless user or a flaky cluster produces: two processes on one run, rows
left by earlier attempts, full or read-only disks, damaged files, exploding losses, bad floats, a
missing GPU, Ctrl-C at start-up, a corrupt image behind loader workers (issue: Edges that give
wrong numbers or lose work)."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from linft.cli.app import INTERRUPTED, main
from linft.data.synthetic import make_image_tree
from linft.errors import ConfigError, LinftError
from linft.runs.config import RunConfig
from linft.runs.store import RunDir, RunLocked, StoreWriteError, lock_holder, run_state
from linft.training.launch import RunFailed, check_device, train
from linft.training.trainer import Trainer, divergence_limit
from conftest import tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_tree(root, "PACS", n_per_class=3, size=16)
    return root


def tiny(data_root, **kw):
    return tiny_config(data_root, **{"mode": "tail", **kw})


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The rows of an uninterrupted run."""
    rd = train(tiny(data_root), tmp_path_factory.mktemp("ref"))
    assert rd.done
    return comparable(rd.read_rows())


def comparable(rows):
    return [json.dumps(r, sort_keys=True) for r in rows if r.get("metric") != "img_per_s"]


def interrupted(data_root, root, at_step=6):
    """A run stopped (as by a kill) when it evaluates ``at_step``: checkpoint of the previous evaluation."""
    cfg = tiny(data_root)
    original = Trainer._evaluate

    def stop(self, step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(self, step)
    Trainer._evaluate = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, root)
    finally:
        Trainer._evaluate = original
    rd = RunDir(root, cfg)
    assert rd.checkpoint_path.exists() and not rd.done
    return cfg, rd


HOLD = textwrap.dedent("""
    import sys, time
    from linft.runs.store import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# -- one process per run ---------------------------------------------------------------------------
def test_second_process_is_refused_naming_the_holder_and_a_killed_holder_releases(data_root, tmp_path, capsys,
                                                                                   reference):
    cfg = tiny(data_root)
    rd = RunDir(tmp_path, cfg)
    proc = _holder(rd.path)
    try:
        assert lock_holder(rd.path).startswith(f"pid {proc.pid} on ")
        assert run_state(rd.path) == "running"
        with pytest.raises(RunLocked, match=f"being trained by pid {proc.pid} on "):
            train(cfg, tmp_path)
        args = ["train", "--root", str(tmp_path)] + [x for k, v in cfg.to_dict().items() if k in (
            "dataset", "data_root", "backbone", "k", "resolution", "mode", "steps", "eval_every", "traj_start",
            "batch_size", "lr", "quiet") for x in (f"--{k.replace('_', '-')}", str(v))] + ["--lr-decay-steps", "4"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {proc.pid}" in err[0], err
        assert not rd.rows_path.exists()  # the refused process wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)  # a killed holder (a preempted Slurm job) releases its lock
        proc.wait()
    assert lock_holder(rd.path) is None
    assert train(cfg, tmp_path).done
    assert comparable(rd.read_rows()) == reference


@pytest.mark.slow
def test_two_linft_train_on_one_config_train_it_once(data_root, tmp_path):
    cfg = tiny(data_root, steps=60, eval_every=20, lr_decay_steps=(40,))
    cmd = [sys.executable, "-m", "linft.cli", "train", "--root", str(tmp_path), "--data-root", str(data_root),
           "--dataset", "PACS", "--backbone", "tiny_resnet", "--k", "2", "--resolution", "16", "--mode", "tail",
           "--steps", "60", "--eval-every", "20", "--traj-start", "1", "--lr-decay-steps", "40",
           "--batch-size", "4", "--lr", "0.05", "--quiet", "true"]
    rd = RunDir(tmp_path, cfg)
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while lock_holder(rd.path) is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    if second.returncode != 0:  # it ran while the first held the run (else the first had finished)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and f"pid {first.pid}" in err[0], second.stderr
    rows = [json.dumps({k: v for k, v in r.items() if k != "value"}, sort_keys=True) for r in rd.read_rows()]
    assert rd.done and len(rows) == len(set(rows))


def test_sweeps_skip_a_locked_run_and_report_it_running(data_root, tmp_path):
    from linft.sweeps.grid import Experiment, delete_incomplete, launch, status
    from linft.sweeps.slurm import SlurmOptions, TrainRun, launch_slurm
    cfg = tiny(data_root)
    exp = Experiment("faults", "", "", [cfg])
    rd = RunDir(tmp_path, cfg)
    proc = _holder(rd.path)
    try:
        counts = launch(exp, tmp_path)
        assert counts["running"] == 1 and counts["done"] == 0
        assert not rd.rows_path.exists() and not (tmp_path / ".sweep" / f"{cfg.run_id}.log").exists()
        assert [c.run_id for c in status(exp, tmp_path)["running"]] == [cfg.run_id]
        assert delete_incomplete(exp, tmp_path) == [] and rd.path.exists()
        assert launch_slurm(exp, tmp_path, SlurmOptions(cluster="local")) == []
        assert TrainRun(cfg.to_dict(), str(tmp_path))() == "running"  # a duplicate job trains nothing
        assert not rd.rows_path.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert TrainRun(cfg.to_dict(), str(tmp_path))() == "done"  # the requeued job takes over


# -- rows after faults -----------------------------------------------------------------------------
def test_a_run_without_checkpoint_starts_from_empty_rows(data_root, tmp_path, reference):
    """Killed during its first checkpoint write, or its damaged checkpoint deleted: whatever rows
    an earlier attempt left (duplicates, a garbage middle line, a torn tail) are not kept."""
    cfg = tiny(data_root)
    rd = RunDir(tmp_path, cfg)
    rd.path.mkdir(parents=True)
    old = [json.dumps(json.loads(r)) for r in reference[:50]]
    rd.rows_path.write_text("\n".join(old + ["garbage{", *old]) + '\n{"run": "x", "st')
    assert train(cfg, tmp_path).done
    assert comparable(rd.read_rows()) == reference


def test_resume_keeps_exactly_the_rows_up_to_the_checkpoint(data_root, tmp_path, reference):
    cfg, rd = interrupted(data_root, tmp_path)
    rows = rd.read_rows()
    assert {r["step"] for r in rows} == {0, 3}
    # earlier attempts (before the fix) appended the same rows again, and rows past the checkpoint
    extra = rows + [dict(r, step=5) for r in rows[:10]]
    with open(rd.rows_path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in extra))
    assert train(cfg, tmp_path).done
    assert comparable(rd.read_rows()) == reference


def test_a_damaged_middle_row_with_a_checkpoint_is_one_error_naming_file_and_line(data_root, tmp_path):
    cfg, rd = interrupted(data_root, tmp_path)
    lines = rd.rows_path.read_text().splitlines()
    lines[3] = "not json"
    rd.rows_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LinftError, match=r"results\.jsonl:4: damaged row.*delete .*checkpoint\.pt"):
        train(cfg, tmp_path)


# -- disk trouble and damaged files ----------------------------------------------------------------
def test_disk_full_mid_run_is_one_line_and_the_run_resumes(data_root, tmp_path, monkeypatch, reference):
    import linft.runs.store as store
    cfg = tiny(data_root)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(store.os, "fsync", fsync)
    with pytest.raises(StoreWriteError, match=r"cannot write .*: No space left on device \(free some space\)"):
        train(cfg, tmp_path)
    monkeypatch.setattr(store.os, "fsync", real_fsync)
    assert train(cfg, tmp_path).done
    assert comparable(RunDir(tmp_path, cfg).read_rows()) == reference


def test_torch_save_failing_on_a_full_disk_is_one_line(data_root, tmp_path, monkeypatch):
    import torch  # the store imports torch where it saves

    def save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] .\nPytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(StoreWriteError, match=r"checkpoint\.pt: PytorchStreamWriter failed writing file"):
        train(tiny(data_root), tmp_path)
    assert not [p for p in RunDir(tmp_path, tiny(data_root)).path.iterdir() if p.name.startswith(".checkpoint")]


def test_a_read_only_runs_root_is_one_line(data_root, tmp_path, monkeypatch, capsys):
    def mkdir(path, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(os, "mkdir", mkdir)
    root = tmp_path / "ro"
    assert main(["train", "--root", str(root), "--dataset", "PACS", "--data-root", str(data_root),
                 "--backbone", "tiny_resnet", "--resolution", "16", "--steps", "2", "--quiet", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "choose another --root" in err[0], err


def test_a_truncated_checkpoint_says_it_is_damaged_and_how_to_recover(data_root, tmp_path, reference):
    cfg, rd = interrupted(data_root, tmp_path)
    data = rd.checkpoint_path.read_bytes()
    rd.checkpoint_path.write_bytes(data[:len(data) // 2])
    with pytest.raises(LinftError, match=r"checkpoint\.pt is damaged .*delete it .*restarts from step 0"):
        train(cfg, tmp_path)
    rd.checkpoint_path.unlink()
    assert train(cfg, tmp_path).done
    assert comparable(rd.read_rows()) == reference


def test_a_truncated_config_json_is_one_line(data_root, tmp_path):
    cfg, rd = interrupted(data_root, tmp_path)
    cfg_file = rd.path / "config.json"
    cfg_file.write_text(cfg_file.read_text()[:40])
    with pytest.raises(LinftError, match=r"config\.json is damaged"):
        train(cfg, tmp_path)


def test_a_hand_edited_config_is_refused_by_collect_and_train(data_root, tmp_path):
    from linft.results.collect import load_rows
    cfg = tiny(data_root)
    rd = train(cfg, tmp_path)
    assert len(load_rows(tmp_path))
    cfg_file = rd.path / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "lr": 0.5}))
    with pytest.raises(LinftError, match=f"was edited: it describes run tail-[0-9a-f]{{12}}, not {cfg.run_id}"):
        load_rows(tmp_path)
    with pytest.raises(LinftError, match="was edited"):
        train(cfg, tmp_path)


# -- divergence, float fields, devices --------------------------------------------------------------
def test_an_exploding_finite_loss_fails_the_run_with_step_and_reason(data_root, tmp_path, monkeypatch):
    original = Trainer._loss
    state = {"n": 0}

    def exploding(self, module, batches):
        state["n"] += 1
        loss = original(self, module, batches)
        return loss * (1e9 if state["n"] >= 3 else 1.0)  # 1e9: finite, far past the limit
    monkeypatch.setattr(Trainer, "_loss", exploding)
    cfg = tiny(data_root)
    with pytest.raises(RunFailed, match="diverged: loss .* at step 3 exceeds"):
        train(cfg, tmp_path)
    rd = RunDir(tmp_path, cfg)
    assert not rd.done and "at step 3" in rd.failed
    rows = rd.read_rows()
    assert {r["step"] for r in rows if r["kind"] == "eval"} == {0}  # rows kept
    bad = [r for r in rows if r["kind"] == "train" and r["step"] == 3]
    assert bad and bad[0]["value"] > 1e6


def test_the_divergence_limit():
    assert divergence_limit(None, 7) == pytest.approx(1e3 * math.log(7))
    assert divergence_limit(5.0, 7) == pytest.approx(5e3)
    assert divergence_limit(1e5, 7) == 1e6           # the absolute cap
    assert divergence_limit(float("nan"), 2) == pytest.approx(1e3 * math.log(2))


@pytest.mark.parametrize("field,value", [("lr_decay", float("nan")), ("lr_decay", -1.0), ("lr_decay", 0.0),
                                         ("lr_decay", 2.0), ("lr", float("inf")), ("lr", float("nan")),
                                         ("weight_decay", float("nan")), ("last_layer_lr_mult", float("inf")),
                                         ("momentum", float("nan")), ("holdout", float("nan")), ("p", float("nan"))])
def test_every_float_field_is_finite_and_in_range(field, value):
    with pytest.raises(ConfigError, match=field if field != "p" else "p"):
        RunConfig(**{field: value})
    with pytest.raises(ConfigError):
        RunConfig.from_dict({field: str(value)})
    RunConfig(lr_decay=1.0)  # 1: no decay


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_line(data_root, tmp_path, capsys):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible here"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="device 'gpu'"):
        check_device("gpu")
    assert main(["train", "--root", str(tmp_path), "--dataset", "PACS", "--data-root", str(data_root),
                 "--backbone", "tiny_resnet", "--device", "cuda", "--quiet", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0], err


# -- Ctrl-C at start-up, loader workers ------------------------------------------------------------
@pytest.fixture
def sigint_as_in_a_terminal():
    """A process started in the background of a script inherits SIGINT ignored, and the CLI (rightly)
    keeps ignoring it there; this test is about a terminal, where Ctrl-C raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_the_cli_starts_is_one_line(monkeypatch, capsys, sigint_as_in_a_terminal):
    import linft.cli.commands as commands

    def interrupted_imports(sub):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "register_all", interrupted_imports)
    assert main(["train", "--help"]) == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    def broken_by_the_interrupt(sub):  # Ctrl-C mid-import leaves numpy half-imported: a RecursionError later
        os.kill(os.getpid(), signal.SIGINT)
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(commands, "register_all", broken_by_the_interrupt)
    assert main(["train"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [INTERRUPTED]

    ran = []

    def imports_then_ctrl_c(sub):  # the Ctrl-C is held until the imports are done, then the command never runs
        os.kill(os.getpid(), signal.SIGINT)
        sub.add_parser("noop").set_defaults(func=lambda args: ran.append(1))
    monkeypatch.setattr(commands, "register_all", imports_then_ctrl_c)
    assert main(["noop"]) == 130 and not ran
    assert capsys.readouterr().err.strip().splitlines() == [INTERRUPTED]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    # `import linft` (before main can catch anything) imports no torch
    out = subprocess.run([sys.executable, "-c", "import sys, linft.cli; print('torch' in sys.modules)"],
                         env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_sigint_during_start_up_prints_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "linft.cli", "train", "--root", str(tmp_path), "--data-root", str(tmp_path / "none")]
    for delay in (0.15, 0.3, 0.45, 0.6, 0.8, 1.0):
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, (delay, err)
        assert len(err.strip().splitlines()) <= 1, (delay, err)


def test_a_corrupt_image_behind_loader_workers_is_one_line_naming_it(tmp_path):
    from linft.data.datasets import get_dataset
    from linft.data.errors import CorruptImageError
    from linft.data.loaders import eval_loaders, train_loaders, zip_minibatches
    from linft.data.splits import make_splits
    from linft.data.transforms import eval_transform
    make_image_tree(tmp_path, "PACS", n_per_class=2, size=16)
    ds = get_dataset("PACS", tmp_path)
    env = ds[ds.environments[1]]
    bad = env.samples[0][0]
    bad.write_bytes(b"not an image at all")
    splits = [s for s in make_splits(ds, [ds.environments[0]], 0.5, 0) if s.env == env.name]
    tf = eval_transform((0.5,) * 3, (0.5,) * 3, 16)
    with pytest.raises(CorruptImageError) as err:
        for _ in zip(range(20), zip_minibatches(train_loaders(ds, splits, tf, batch_size=8, num_workers=2))):
            pass
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "Traceback" not in msg, msg
    with pytest.raises(CorruptImageError) as err:
        for loader in eval_loaders(ds, splits, tf, batch_size=4, num_workers=2).values():
            for _ in loader:
                pass
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
