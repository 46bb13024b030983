"""A tool researchers enjoy: help written once in RunConfig, --flag/--no-flag, --version, a fast
parser, live evaluation lines (also in sweep logs), TensorBoard, the user's own weights, frugal run
folders (issue: usability)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from linft.cli.app import _build_parser, main
from linft.cli.train import config_from_args
from linft.data.synthetic import make_image_tree
from linft.runs.config import RunConfig
from linft.runs.store import RunDir, run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="PACS", backbone="tiny_resnet", k=2, resolution=16, steps=4, eval_every=2, traj_start=1,
            lr_decay_steps=(3,), batch_size=4, lr=0.05, mode="tail")
TINY_ARGS = ["--dataset", "PACS", "--backbone", "tiny_resnet", "--k", "2", "--resolution", "16", "--steps", "4",
             "--eval-every", "2", "--traj-start", "1", "--lr-decay-steps", "3", "--batch-size", "4", "--lr", "0.05",
             "--mode", "tail"]


def cli(*args, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "linft", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("usability-data")
    make_image_tree(root, "PACS", n_per_class=4, size=16)
    return root


def tiny(data_root, **kw):
    return RunConfig(**{**TINY, "data_root": str(data_root), "quiet": True, **kw})


def train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    return capsys.readouterr().out


# -- 1. help from the config itself ------------------------------------------------------------
def test_train_help_shows_meaning_unit_choices_and_defaults(capsys):
    out = " ".join(train_help(capsys).split())  # argparse wraps lines
    assert "dropout rate on the pooled representation, in [0, 1) (default: 0.0)" in out
    assert "linear: trains first-order Taylor model" in out          # every mode, from MODES
    assert "--loader {pil,device}" in out and "one of pil, device" in out
    assert "--lin-engine {jvp,onepass}" in out and "--head-init {random,probe}" in out
    assert "[steps] (default: 10000)" in out                          # a unit
    assert "--augment, --no-augment" in out
    for flag in ("--weights-file", "--tensorboard", "--keep-checkpoint"):
        assert flag in out
    assert "never change the run id" in out


def test_every_field_has_help():
    from linft.runs.config import field_docs
    assert all(d.help for d in field_docs()), [d.name for d in field_docs() if not d.help]


@pytest.mark.parametrize("flags, augment", [([], True), (["--no-augment"], False), (["--augment", "false"], False),
                                            (["--augment", "true"], True), (["--augment"], True),
                                            (["--augment", "0"], False)])
def test_boolean_flags(flags, augment):
    args = _build_parser().parse_args(["train", *flags])
    assert config_from_args(args).augment is augment


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        _build_parser().parse_args(["train", "--mode", "fulll"])
    assert e.value.code == 2 and "invalid choice: 'fulll'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["train", "--no-augment", "yes"])


def test_version_and_python_m_linft():
    r = cli("--version")
    import linft
    assert r.returncode == 0 and r.stdout.strip() == f"linft {linft.__version__}"
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sweep" in r.stdout


def test_building_the_parser_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time, json; t = time.perf_counter(); from linft.cli.app import _build_parser; "
            "_build_parser(['--help']); _build_parser(['train', '--help']); _build_parser(['runs', 'ls', 'x']); "
            "dt = time.perf_counter() - t; "
            "print(json.dumps([dt, sorted(m for m in ('torch', 'pandas', 'seaborn', 'matplotlib', 'scipy', "
            "'numpy', 'torchvision', 'timm') if m in sys.modules)]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    dt, heavy = json.loads(r.stdout)
    assert heavy == []
    assert dt < 1.0
    t = time.perf_counter()
    assert cli("--help").returncode == 0
    assert time.perf_counter() - t < 3.0  # python start-up included, on a busy machine


# -- 2. live progress ---------------------------------------------------------------------------
def test_one_line_per_evaluation_streams_to_stdout(data_root, tmp_path):
    """Lines reach a file (no terminal) while the run is still training, and no bar is drawn."""
    log = tmp_path / "log"
    args = [*TINY_ARGS, "--steps", "400", "--eval-every", "2", "--data-root", str(data_root),
            "--root", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "linft", "train", *args], stdout=f,
                                stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while "step 4/400" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended (or failed) before its lines were seen: " + log.read_text()
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode()
    assert "step" not in err and "it/s" not in err  # no bar (stderr is no terminal), no lines there
    text = log.read_text()
    assert "\r" not in text
    first = [line for line in text.splitlines() if "step 2/400" in line][0]
    for part in ("lr 5.00e-02", "train loss", "iid acc 0.", "ood acc 0.", "img/s"):
        assert part in first, first


def test_sweep_log_gets_the_live_lines(data_root, tmp_path):
    from linft.sweeps.grid import launch, load_experiment
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text('[base]\ndataset = "PACS"\nbackbone = "tiny_resnet"\nk = 2\nresolution = 16\nsteps = 4\n'
                        'eval_every = 2\ntraj_start = 1\nlr_decay_steps = [3]\nbatch_size = 4\nlr = 0.05\n'
                        'mode = "tail"\n[grid]\np = [0.0]\n')
    exp = load_experiment(str(exp_file), data_root=str(data_root))
    assert launch(exp, tmp_path / "runs")["done"] == 1
    text = (tmp_path / "runs" / ".sweep" / f"{exp.configs[0].run_id}.log").read_text()
    rid = exp.configs[0].run_id
    steps = [line.split(" step ")[1].split()[0] for line in text.splitlines() if line.startswith(rid + " step ")]
    assert steps == ["0/4", "2/4", "4/4"], text
    assert "\r" not in text


def test_quiet_prints_nothing(data_root, tmp_path, capsys):
    from linft.training.launch import train
    train(tiny(data_root), tmp_path)
    out = capsys.readouterr()
    assert "step" not in out.out and "step" not in out.err


# -- 3. TensorBoard -----------------------------------------------------------------------------
def test_tensorboard_mirrors_rows_and_hparams(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from linft.training.launch import train
    cfg = tiny(data_root, tensorboard=str(tmp_path / "tb"))
    assert cfg.run_id == tiny(data_root).run_id  # not semantic
    rd = train(cfg, tmp_path / "runs")
    ea = EventAccumulator(str(tmp_path / "tb" / cfg.run_id))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    envs = {r["env"]: r["role"] for r in rd.read_rows() if r.get("kind") == "eval"}
    train_env = next(e for e, role in envs.items() if role == "train")
    test_env = next(e for e, role in envs.items() if role == "test")
    for tag in ("train/loss", "train/img_per_s", f"eval/current/acc/{train_env}_out", f"eval/current/loss/{test_env}_in",
                f"eval/traj_avg/acc/{test_env}_in", f"select/train_val/current/acc/{test_env}_in"):
        assert tag in tags, (tag, sorted(tags))
    acc = [e for e in ea.Scalars(f"eval/current/acc/{train_env}_out")]
    rows = [r for r in rd.read_rows() if r.get("kind") == "eval" and r["model"] == "current" and r["metric"] == "acc"
            and r["env"] == train_env and r["split"] == "out"]
    assert [e.step for e in acc] == [r["step"] for r in rows] == [0, 2, 4]
    assert [e.value for e in acc] == pytest.approx([r["value"] for r in rows])
    assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")


def test_tensorboard_missing_is_one_line(monkeypatch):
    from linft.errors import ConfigError
    from linft.training.tensorboard import require_tensorboard
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'linft\[tensorboard\]'"):
        require_tensorboard()


# -- 4. the user's own weights ------------------------------------------------------------------
def _weights(path, seed=0, **kw):
    from linft.models.backbones import TinyResNet
    torch.manual_seed(seed)
    net = TinyResNet(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    torch.save(net.state_dict(), path)
    return net


def test_weights_file_identity_is_its_content(tmp_path):
    a, b, c = tmp_path / "a.pth", tmp_path / "elsewhere" / "b.pth", tmp_path / "c.pth"
    b.parent.mkdir()
    _weights(a)
    shutil.copy(a, b)
    _weights(c, seed=1)
    ids = {name: RunConfig(backbone="tiny_resnet", weights_file=str(p)).run_id for name, p in (("a", a), ("b", b), ("c", c))}
    assert ids["a"] == ids["b"]                               # same file at two paths
    assert ids["a"] != ids["c"]                               # other content
    assert ids["a"] != RunConfig(backbone="tiny_resnet").run_id
    # from the command line, and from a stored config.json read where the file is absent
    args = _build_parser().parse_args(["train", "--backbone", "tiny_resnet", "--weights-file", str(b)])
    cfg = config_from_args(args)
    assert cfg.run_id == ids["a"]
    stored = cfg.to_dict()
    a.unlink()
    b.unlink()
    assert RunConfig.from_dict(stored).run_id == ids["a"]
    _weights(b, seed=2)  # the file changed under a recorded hash
    with pytest.raises(Exception, match="the file changed"):
        RunConfig.from_dict(stored)


def test_weights_file_is_what_the_run_starts_from(data_root, tmp_path):
    from linft.training.pipeline import build_pipeline
    net = _weights(tmp_path / "w.pth")
    pipe = build_pipeline(tiny(data_root, weights_file=str(tmp_path / "w.pth")), 7, torch.device("cpu"))
    assert torch.equal(pipe.pre.state_dict()["0.weight"] if "0.weight" in pipe.pre.state_dict()
                       else next(iter(pipe.pre.state_dict().values())), net.conv1.weight)


def test_wrong_architecture_file_is_one_line_via_the_cli(data_root, tmp_path):
    _weights(tmp_path / "bottleneck.pth", block="bottleneck")
    r = cli("train", *TINY_ARGS, "--data-root", str(data_root), "--root", str(tmp_path / "runs"),
            "--weights-file", str(tmp_path / "bottleneck.pth"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("linft: error: weights file") and "does not fit tiny_resnet" in err[0]
    assert ("unexpected keys" in err[0] or "shape mismatches" in err[0]) and "Traceback" not in r.stderr
    r = cli("train", *TINY_ARGS, "--weights-file", str(tmp_path / "nope.pth"))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- 5. frugal run folders ----------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_checkpoint_kept_until_done_then_dropped(data_root, tmp_path):
    from linft.analysis.loading import load_run
    from linft.training.launch import train
    from linft.training.trainer import Trainer
    cfg = tiny(data_root)
    tr = Trainer(cfg.replace(checkpoint_every=1), tmp_path)
    real = tr._evaluate

    def evaluate(step):
        if step == 4:
            raise _Stop
        return real(step)
    tr._evaluate = evaluate
    with pytest.raises(_Stop):
        tr.run()
    rd = RunDir(tmp_path, cfg)
    assert rd.checkpoint_path.exists() and not rd.done and run_state(rd.path) == "running"
    train(cfg, tmp_path)  # resumes from the checkpoint
    assert rd.done and rd.final_path.exists() and not rd.checkpoint_path.exists()
    assert run_state(rd.path) == "done"
    assert load_run(rd.path).theta  # still analysable
    kept = train(cfg.replace(seed=1, keep_checkpoint=True), tmp_path)
    assert kept.checkpoint_path.exists() and kept.done


def test_runs_ls_shows_distinguishing_fields_and_disk_and_gc(data_root, tmp_path, capsys):
    from linft.training.launch import train
    for n in (4, 6, 8):
        train(tiny(data_root, n_per_domain=n, keep_checkpoint=True), tmp_path)
    assert main(["runs", "ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "state", "step", "disk", "mode", "n_per_domain"]
    assert sorted(line.split()[-1] for line in out[1:]) == ["4", "6", "8"]
    assert all(" KB" in line or " MB" in line for line in out[1:])
    assert main(["runs", "gc", str(tmp_path), "--dry-run"]) == 0
    assert "would reclaim" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*/checkpoint.pt"))) == 3
    assert main(["runs", "gc", str(tmp_path)]) == 0
    assert "reclaimed" in capsys.readouterr().out.splitlines()[-1]
    assert not list(tmp_path.glob("*/checkpoint.pt"))
    assert all(run_state(p) == "done" for p in tmp_path.iterdir() if (p / "config.json").exists())


# -- 6. parquet without pyarrow -----------------------------------------------------------------
def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["collect", "--root", str(tmp_path), "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'linft[parquet]'" in err[0]


def test_slurm_job_log_gets_the_live_lines(data_root, tmp_path, monkeypatch):
    """The Slurm launcher no longer forces quiet: the job's log (submitit's local executor here)
    holds one line per evaluation, without bar redraws."""
    pytest.importorskip("submitit")
    from linft.sweeps.grid import load_experiment
    from linft.sweeps.slurm import SlurmOptions, launch_slurm
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text('[base]\ndataset = "PACS"\nbackbone = "tiny_resnet"\nk = 2\nresolution = 16\nsteps = 4\n'
                        'eval_every = 2\ntraj_start = 1\nlr_decay_steps = [3]\nbatch_size = 4\nlr = 0.05\n'
                        'mode = "tail"\n[grid]\np = [0.5]\n')
    exp = load_experiment(str(exp_file), data_root=str(data_root))
    jobs = launch_slurm(exp, tmp_path / "runs", SlurmOptions(cluster="local", time_min=5))
    assert jobs[0].result() == "done"
    rid = exp.configs[0].run_id
    log = (tmp_path / "runs" / rid / "slurm.out").read_text()
    assert [line.split()[2] for line in log.splitlines() if line.startswith(rid + " step ")] == ["0/4", "2/4", "4/4"]
    assert "\r" not in log
