"""The fine-tuning engine on a tiny generated PACS-shaped tree (issue: Fine-tuning engine)."""
import math

import pytest
import torch

from linft.runs.config import RunConfig
from linft.data.synthetic import make_image_tree
from linft.errors import ConfigError
from linft.training.evaluate import TrajectoryAverage, TrajectoryEnsemble
from linft.runs.store import RunDir, load_checkpoint
from linft.training.launch import RunFailed, train
from conftest import tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_tree(root, "PACS", n_per_class=5, size=16)
    return root


def tiny(data_root, **kw):
    return tiny_config(data_root, **kw)


def rows_of(rd: RunDir, drop=("img_per_s",)):
    return [r for r in rd.read_rows() if r.get("metric") not in drop]


@pytest.mark.parametrize("mode", ["full", "scratch", "tail", "linear", "unfolded", "probe"])
def test_every_mode_trains_and_records_rows(data_root, tmp_path, mode):
    cfg = tiny(data_root, mode=mode, p=0.5, k=3 if mode == "unfolded" else 2)
    rd = train(cfg, tmp_path)
    assert rd.done and rd.final_path.exists()
    rows = rd.read_rows()
    evals = [r for r in rows if r["kind"] == "eval"]
    assert {r["env"] for r in evals} == {"A", "C", "P", "S"}
    assert {r["split"] for r in evals} == {"in", "out"}
    assert {r["step"] for r in evals} == {0, 3, 6}
    assert {r["model"] for r in evals} == {"current", "traj_avg", "traj_ens"}
    assert {r["role"] for r in evals if r["env"] == "A"} == {"test"}
    sel = [r for r in rows if r["kind"] == "select"]
    assert {r["selection"] for r in sel} == {"train_val", "oracle"}
    assert all(math.isfinite(r["value"]) for r in evals)
    # the parameters moved
    ck = load_checkpoint(rd.final_path)["trainable"]
    assert ck


def test_linear_mode_starts_at_the_network(data_root, tmp_path):
    """At step 0 the linearized run and the tail run are the same function (same seed, same head)."""
    lin = train(tiny(data_root, mode="linear", steps=1, eval_every=1), tmp_path)
    tail = train(tiny(data_root, mode="tail", steps=1, eval_every=1), tmp_path)
    a = {(r["env"], r["split"], r["metric"]): r["value"] for r in lin.read_rows() if r.get("step") == 0 and r["kind"] == "eval"}
    b = {(r["env"], r["split"], r["metric"]): r["value"] for r in tail.read_rows() if r.get("step") == 0 and r["kind"] == "eval"}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_done_run_returns_at_once_and_ids_are_semantic(data_root, tmp_path):
    cfg = tiny(data_root, mode="probe")
    rd = train(cfg, tmp_path)
    mtime = rd.rows_path.stat().st_mtime_ns
    assert train(cfg.replace(quiet=False, workers=0, data_root=str(data_root) + "/"), tmp_path).path == rd.path
    assert rd.rows_path.stat().st_mtime_ns == mtime
    assert cfg.replace(p=0.9).run_id != cfg.run_id
    assert RunConfig().run_id == RunConfig(device="cpu", data_root="/elsewhere", workers=4).run_id


def test_cached_features_equal_on_the_fly(data_root, tmp_path):
    a = train(tiny(data_root, mode="tail", augment=False), tmp_path / "a")
    b = train(tiny(data_root, mode="tail", augment=False, feature_cache=True, cache_dir=str(tmp_path / "cache")),
              tmp_path / "b")
    wa, wb = load_checkpoint(a.final_path)["trainable"], load_checkpoint(b.final_path)["trainable"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_divergence_marks_failed_and_keeps_rows(data_root, tmp_path):
    cfg = tiny(data_root, mode="tail", lr=1e12, steps=30)
    with pytest.raises(RunFailed, match="non-finite loss"):
        train(cfg, tmp_path)
    rd = RunDir(tmp_path, cfg)
    assert "non-finite loss" in rd.failed and "at step" in rd.failed
    assert any(r["kind"] == "eval" and r["step"] == 0 for r in rd.read_rows())
    assert not rd.done


def test_config_validation_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        RunConfig(p=1.0)
    with pytest.raises(ConfigError, match="mode must be one of"):
        RunConfig(mode="lora")
    with pytest.raises(ConfigError, match="exclude each other"):
        RunConfig(mode="tail", feature_cache=True)
    with pytest.raises(ConfigError, match="unknown config field"):
        RunConfig.from_dict({"learning_rate": 1})
    f = tmp_path / "c.toml"
    f.write_text('mode = "linear"\np = 0.9\nlr_decay_steps = [100, 200]\n')
    cfg = RunConfig.from_file(f)
    assert cfg.mode == "linear" and cfg.lr_decay_steps == (100, 200)
    from linft.cli.app import _build_parser
    from linft.cli.train import config_from_args
    args = _build_parser().parse_args(["train", "--config", str(f), "--p", "0.5", "--seed", "3"])
    cfg = config_from_args(args)
    assert (cfg.mode, cfg.p, cfg.seed) == ("linear", 0.5, 3)
    assert RunConfig().steps == 10_000 and RunConfig().lr_decay_steps == (5_000,) and RunConfig().momentum == 0.9


def test_trajectory_average_and_ensemble():
    net = torch.nn.Linear(2, 2)
    avg = TrajectoryAverage(start=1)
    seen = []
    for step in range(1, 5):
        with torch.no_grad():
            net.weight.add_(step)
        avg.update(step, net)
        if step > 1:
            seen.append(net.weight.detach().clone())
    assert torch.allclose(avg.params(net)["weight"], torch.stack(seen).mean(0))
    ens = TrajectoryEnsemble(start=3)
    assert not ens.add(0, {("A", "in"): torch.ones(2, 2)})
    ens.add(3, {("A", "in"): torch.tensor([[1.0, 0.0]])})
    ens.add(6, {("A", "in"): torch.tensor([[0.0, 3.0]])})
    assert torch.equal(ens.logits(("A", "in")), torch.tensor([[0.5, 1.5]]))
    state = ens.state_dict()
    other = TrajectoryEnsemble(0)
    other.load_state_dict(state)
    assert torch.equal(other.logits(("A", "in")), ens.logits(("A", "in")))


def test_soups_across_runs(data_root, tmp_path):
    from linft.analysis.soups import soups
    from linft.analysis.loading import restore_run
    runs = [train(tiny(data_root, mode="tail", lr=lr), tmp_path).path for lr in (0.05, 0.02, 0.01)]
    rows = soups(runs, tmp_path)
    models = {r["model"] for r in rows}
    assert models == {"uniform_soup", "greedy_soup", "output_ensemble"}
    greedy_n = {r["members"] for r in rows if r["model"] == "greedy_soup"}
    assert len(greedy_n) == 1 and 1 <= greedy_n.pop() <= 3
    # restoring a run reproduces its final evaluation exactly
    t = restore_run(runs[0])
    last = {(r["env"], r["split"]): r["value"] for r in RunDir(tmp_path, t.cfg).read_rows()
            if r.get("kind") == "eval" and r["model"] == "current" and r["step"] == 6 and r["metric"] == "acc"}
    from linft.training.evaluate import metrics, predict
    for key, loader in t.data.eval_loaders.items():
        lg, y = predict(t.pipe.pre, t.pipe.post, t.pipe.trainable, loader, t.device)
        assert metrics(lg, y)["acc"] == last[key]
    # a soup of a run with itself is the run
    same = soups([runs[0], runs[0]], tmp_path / "self")
    for r in same:
        if r["metric"] == "acc":
            assert r["value"] == last[(r["env"], r["split"])], r


def test_device_loader_trains_resumes_and_evaluates_like_pil(data_root, tmp_path):
    """loader="device": uint8 store + batched augmentation. Step t's batch depends on (seed, t) only
    (resume is exact); without augmentation the eval inputs match the PIL eval transform closely."""
    from linft.training.run_data import RunData
    from linft.training.pipeline import build_pipeline
    cfg = tiny(data_root, mode="full", loader="device", cache_dir=str(tmp_path / "cache"))
    data = RunData(cfg, torch.device("cpu"))
    pipe = build_pipeline(cfg, data.num_classes, torch.device("cpu"))
    data.attach(pipe)
    stream = data.train_batches(start=0)
    first = [next(stream) for _ in range(3)]
    resumed = next(data.train_batches(start=2))
    assert len(resumed) == 3  # one batch per training domain
    for (xa, ya), (xb, yb) in zip(first[2], resumed):
        assert xa.shape == (4, 3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][0][0], first[1][0][0])
    # eval batches: same examples and labels as the PIL loader, images within resize rounding
    pil = RunData(cfg.replace(loader="pil"), torch.device("cpu"))
    pil.attach(build_pipeline(cfg, pil.num_classes, torch.device("cpu")))
    assert data.eval_loaders.keys() == pil.eval_loaders.keys()
    key = ("P", "out")
    xd, yd = next(iter(data.eval_loaders[key]))
    xp, yp = next(iter(pil.eval_loaders[key]))
    assert torch.equal(yd, yp) and xd.shape == xp.shape
    assert (xd - xp).abs().mean() < 0.15  # two bilinear resizes (S = 18 -> 16) vs one, in normalised units
    rd = train(cfg, tmp_path / "runs")
    assert rd.done and {r["env"] for r in rd.read_rows() if r["kind"] == "eval"} == {"A", "C", "P", "S"}
    with pytest.raises(ConfigError):
        tiny(data_root, mode="tail", loader="device", feature_cache=True, augment=False)
    with pytest.raises(ConfigError):
        tiny(data_root, loader="dali")


def test_primal_cache_run_equals_plain_linear_run(data_root, tmp_path):
    """lin_primal_cache replays the primal stream at theta0 per example: same examples, same dropout
    masks, so the run is the plain linear run up to float rounding (it is the same run id)."""
    base = tiny(data_root, mode="linear", feature_cache=True, augment=False, p=0.5,
                cache_dir=str(tmp_path / "cache"))
    plain = train(base, tmp_path / "plain")
    cached = train(base.replace(lin_primal_cache=True), tmp_path / "cached")
    assert base.run_id == base.replace(lin_primal_cache=True).run_id
    ra = {(r["kind"], r.get("env"), r.get("split"), r.get("model"), r["step"], r["metric"]): r["value"]
          for r in rows_of(plain) if "step" in r}
    rb = {(r["kind"], r.get("env"), r.get("split"), r.get("model"), r["step"], r["metric"]): r["value"]
          for r in rows_of(cached) if "step" in r}
    assert ra.keys() == rb.keys() and len(ra) > 20
    assert max(abs(ra[k] - rb[k]) for k in ra) < 1e-4
    wa = load_checkpoint(plain.final_path)["trainable"]
    wb = load_checkpoint(cached.final_path)["trainable"]
    moved = max((wa[n] - wa["theta0." + n.replace(".", ":")]).abs().max().item()
                for n in wa if not n.startswith("theta0.") and "theta0." + n.replace(".", ":") in wa)
    assert moved > 1e-3  # the runs trained
    for n in wa:
        assert torch.allclose(wa[n], wb[n], rtol=1e-4, atol=1e-6), n
    with pytest.raises(ConfigError):
        tiny(data_root, mode="tail", feature_cache=True, augment=False, lin_primal_cache=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trainer_paths(data_root, tmp_path):
    """On a GPU: bf16 autocast full fine-tuning fed by the device loader, and the linear mode with
    the primal cache (the paths the CPU tests cover in float32)."""
    full = train(tiny(data_root, mode="full", loader="device", device="cuda", cache_dir=str(tmp_path / "c")),
                 tmp_path / "runs")
    lin = train(tiny(data_root, mode="linear", feature_cache=True, augment=False, lin_primal_cache=True,
                     device="cuda", cache_dir=str(tmp_path / "c")), tmp_path / "runs")
    for rd in (full, lin):
        assert rd.done
        assert all(math.isfinite(r["value"]) for r in rd.read_rows() if r["kind"] == "eval")


def test_predict_keeps_no_graph():
    """Evaluation runs without autograd: logits carry no graph (a graph per eval batch kept every
    activation alive: a 20-step Digits run once peaked at 7.8 GB instead of 1.2 GB)."""
    from linft.training.evaluate import predict
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    loader = [(torch.randn(5, 3, 6, 6), torch.zeros(5, dtype=torch.long)) for _ in range(2)]
    ident = torch.nn.Identity()
    logits, y = predict(ident, ident, net, loader, torch.device("cpu"))
    assert logits.shape == (10, 2) and not logits.requires_grad and logits.grad_fn is None
