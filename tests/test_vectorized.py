"""Vectorised sweeps: a group of runs trained in one vmapped pass writes every member's folder as
the separate run would (issue "Vectorised sweeps"). Float64 on CPU: weights and losses to 1e-10,
accuracies equal."""
import json

import pytest
import torch

import linft.models.backbones as backbones
import linft.training.grouping as grouping
from linft.data.synthetic import make_image_tree
from linft.errors import ConfigError
from linft.runs.config import RunConfig
from linft.runs.store import RunDir, load_checkpoint
from linft.training import group as group_mod
from linft.training.group import train_group
from linft.training.grouping import group_key, make_groups
from linft.training.launch import RunFailed, train
from linft.training.run_data import RunData

TOL = 1e-10


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vdata")
    make_image_tree(root, "PACS", n_per_class=5, size=16)
    return root


class _Cast:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(torch.get_default_dtype()), y


@pytest.fixture
def float64(monkeypatch):
    """Runs in float64: modules built in float64, the (float32) cached features cast on reading, for
    the single-run trainer and the group alike. The tiny backbone's weights are one fixed draw (as
    pre-trained weights are): members differing in seed then share the trunk features."""
    torch.set_default_dtype(torch.float64)
    orig_batches, orig_attach = RunData.train_batches, RunData.attach

    def batches(self, start, stream="train"):
        for step in orig_batches(self, start, stream):
            yield [(x.to(torch.float64), y) for x, y in step]

    def attach(self, pipe):
        orig_attach(self, pipe)
        self.eval_loaders = {k: _Cast(v) for k, v in self.eval_loaders.items()}

    def fixed():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return backbones.TinyResNet()
    import dataclasses
    arch = backbones.ARCHITECTURES["tiny_resnet"]
    monkeypatch.setitem(backbones.ARCHITECTURES, "tiny_resnet", dataclasses.replace(arch, build=fixed))
    monkeypatch.setattr(grouping, "seed_draws_trunk", lambda cfg: False)
    monkeypatch.setattr(RunData, "train_batches", batches)
    monkeypatch.setattr(RunData, "attach", attach)
    yield
    torch.set_default_dtype(torch.float32)


def tiny(data_root, tmp_path, **kw):
    base = dict(dataset="PACS", data_root=str(data_root), backbone="tiny_resnet", k=2, resolution=16,
                steps=6, eval_every=3, traj_start=1, lr_decay_steps=(4,), batch_size=4, lr=0.05, quiet=True,
                mode="tail", feature_cache=True, augment=False, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return RunConfig(**base)


def members(base):
    """Seeds 0, 1, 0 (two share the batch, one does not); p, lr, weight decay, head lr multiplier vary."""
    return [base.replace(seed=0, p=0.5), base.replace(seed=1, p=0.0, lr=0.02, weight_decay=1e-3),
            base.replace(seed=0, p=0.9, last_layer_lr_mult=3.0)]


def assert_same_run(a: RunDir, b: RunDir, tol=TOL):
    assert a.path.name == b.path.name and a.done and b.done
    assert json.loads((a.path / "config.json").read_text()) == json.loads((b.path / "config.json").read_text())
    ra = [r for r in a.read_rows() if r.get("metric") != "img_per_s"]
    rb = [r for r in b.read_rows() if r.get("metric") != "img_per_s"]
    assert len(ra) == len(rb) and ra
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k != "value"} == {k: v for k, v in y.items() if k != "value"}
        if x["metric"] == "acc":
            assert x["value"] == y["value"], x
        else:
            assert abs(x["value"] - y["value"]) <= tol, (x, y["value"])
    fa, fb = load_checkpoint(a.final_path), load_checkpoint(b.final_path)
    assert fa.keys() == fb.keys()
    for part in fa:
        assert fa[part].keys() == fb[part].keys()
        for n in fa[part]:
            assert fa[part][n].dtype == fb[part][n].dtype
            assert torch.allclose(fa[part][n], fb[part][n], atol=tol, rtol=0), (part, n)


def separately(cfgs, root):
    for c in cfgs:
        try:
            train(c, root)
        except RunFailed:
            pass
    return [RunDir(root, c) for c in cfgs]


CASES = {
    "tail": {},
    "tail_probe": dict(head_init="probe", probe_steps=3),
    "linear": dict(mode="linear"),
    "linear_jvp": dict(mode="linear", lin_engine="jvp"),
    "linear_probe": dict(mode="linear", head_init="probe", probe_steps=2),
    "probe": dict(mode="probe"),
    "unfolded": dict(mode="unfolded", k=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_group_equals_separate_runs(float64, data_root, tmp_path, case):
    cfgs = members(tiny(data_root, tmp_path, **CASES[case]))
    ref = separately(cfgs, tmp_path / "a")
    got = train_group(cfgs, tmp_path / "b")
    for a, b in zip(ref, got):
        assert_same_run(a, b)
    first = load_checkpoint(got[0].final_path)["trainable"]
    other = load_checkpoint(got[2].final_path)["trainable"]
    assert any(not torch.equal(first[n], other[n]) for n in first)  # members really differ


def test_members_sharing_the_batch(float64, data_root, tmp_path):
    """All members with one seed: one batch and (linearized tail) one primal stream for all."""
    base = tiny(data_root, tmp_path, mode="linear", steps=4, lr_decay_steps=(2,))
    cfgs = [base.replace(p=p, lr=lr) for p, lr in ((0.0, 0.05), (0.5, 0.1), (0.9, 0.02))]
    for a, b in zip(separately(cfgs, tmp_path / "a"), train_group(cfgs, tmp_path / "b")):
        assert_same_run(a, b)


class Kill(Exception):
    pass


@pytest.mark.parametrize("where,after", [("step", 2), ("step", 4), ("save", 2), ("save", 5), ("save", 8)])
def test_killed_group_resumes_identical(float64, data_root, tmp_path, monkeypatch, where, after):
    """Killed inside a step or between two members' checkpoints (then the members stand at different
    steps): the relaunched group ends identical to an uninterrupted one and to separate runs."""
    cfgs = members(tiny(data_root, tmp_path, checkpoint_every=2))
    ref = separately(cfgs, tmp_path / "a")
    calls = [0]
    target = (group_mod.StackedForward, "__call__") if where == "step" else (group_mod._Member, "save")
    orig = getattr(*target)

    def dying(self, *a, **kw):
        calls[0] += 1
        if calls[0] == after:
            raise Kill
        return orig(self, *a, **kw)
    monkeypatch.setattr(*target, dying)
    with pytest.raises(Kill):
        train_group(cfgs, tmp_path / "b")
    monkeypatch.setattr(*target, orig)
    for a, b in zip(ref, train_group(cfgs, tmp_path / "b")):
        assert_same_run(a, b)


def test_diverging_member_fails_alone(float64, data_root, tmp_path):
    base = tiny(data_root, tmp_path, steps=8, eval_every=4, lr_decay_steps=())
    cfgs = members(base)
    cfgs[1] = cfgs[1].replace(lr=1e8)  # diverges
    ref = separately(cfgs, tmp_path / "a")
    got = train_group(cfgs, tmp_path / "b")
    assert not got[1].done and got[1].failed
    assert got[1].failed == ref[1].failed  # "non-finite loss (nan) at step N", the same N
    assert "at step" in got[1].failed
    assert got[1].read_rows() == ref[1].read_rows() or \
        [r for r in got[1].read_rows() if r["kind"] == "train"][-1] == [r for r in ref[1].read_rows()
                                                                         if r["kind"] == "train"][-1]
    for k in (0, 2):
        assert_same_run(ref[k], got[k])


def test_partly_done_group_trains_only_the_missing(float64, data_root, tmp_path, monkeypatch):
    cfgs = members(tiny(data_root, tmp_path))
    ref = separately(cfgs, tmp_path / "a")
    root = tmp_path / "b"
    train(cfgs[0], root)  # done alone
    mtime = (root / cfgs[0].run_id / "final.pt").stat().st_mtime_ns
    orig = RunDir.append_rows

    class Stop(Exception):
        pass

    def stop(self, rows):  # cfgs[2] alone is killed after its step-3 rows: it resumes from its checkpoint
        orig(self, rows)
        if self.config.run_id == cfgs[2].run_id and any(r.get("step") == 3 for r in rows):
            raise Stop
    monkeypatch.setattr(RunDir, "append_rows", stop)
    with pytest.raises(Stop):
        train(cfgs[2], root)
    monkeypatch.setattr(RunDir, "append_rows", orig)
    built = []
    orig_member = group_mod._Member.__init__

    def record(self, cfg, *a, **kw):
        built.append(cfg.run_id)
        orig_member(self, cfg, *a, **kw)
    monkeypatch.setattr(group_mod._Member, "__init__", record)
    got = train_group(cfgs, root)
    assert built == [cfgs[1].run_id, cfgs[2].run_id]  # the done run is not rebuilt
    assert (root / cfgs[0].run_id / "final.pt").stat().st_mtime_ns == mtime
    for a, b in zip(ref, got):
        assert_same_run(a, b)


def test_grouping(tmp_path):
    base = RunConfig(dataset="PACS", backbone="efficientnet_lite0.in1k", mode="tail", feature_cache=True,
                     augment=False, steps=10)
    grid = [base.replace(seed=s, p=p) for s in (0, 1) for p in (0.0, 0.5, 0.9)]
    other = [base.replace(mode="linear"), base.replace(mode="full", augment=True, feature_cache=False)]
    groups, alone = make_groups(grid + other, 4)
    assert [len(g) for g in groups] == [4, 2]
    assert {c.run_id for c in alone} == {c.run_id for c in other}
    assert group_key(grid[0]) == group_key(grid[-1].replace(lr=3.0, weight_decay=0.0, last_layer_lr_mult=10.0))
    assert group_key(grid[0]) != group_key(grid[0].replace(steps=11))
    # a random-init backbone is drawn from the seed: the seed is then shared too
    tr = RunConfig(backbone="tiny_resnet", mode="tail", feature_cache=True, augment=False)
    assert group_key(tr) != group_key(tr.replace(seed=1)) and group_key(tr) == group_key(tr.replace(p=0.5))
    with pytest.raises(ConfigError, match="differ only in"):
        train_group([base, base.replace(steps=11)], tmp_path)
    with pytest.raises(ConfigError, match="cannot vectorise"):
        train_group([other[1], other[1].replace(p=0.5)], tmp_path)


def test_a_group_that_does_not_fit_is_refused(data_root, tmp_path, monkeypatch):
    from linft.training.pipeline import build_run
    cfgs = [tiny(data_root, tmp_path, p=p) for p in (0.0, 0.5, 0.9)]
    built = build_run(cfgs[0])
    params = sum(p.numel() * p.element_size() for p in built.pipe.trainable.parameters())
    assert grouping.member_bytes(built) > 6 * params  # + the saved activations of one step
    monkeypatch.setattr(grouping, "member_bytes", lambda built: 2**30)
    monkeypatch.setattr(grouping, "available_bytes", lambda device: 2 * 2**30)
    with pytest.raises(ConfigError, match=r"^--vectorize 3 needs about 3.00 GiB \(1024 MiB per run\) but 2.00 GiB "
                                          r"are free on cpu: use --vectorize 1 or less$"):
        train_group(cfgs, tmp_path / "b")
    assert not any((tmp_path / "b" / c.run_id).exists() for c in cfgs)


SWEEP = """
description = "tiny vectorised"
[base]
dataset = "PACS"
backbone = "tiny_resnet"
k = 2
resolution = 16
steps = 4
eval_every = 2
traj_start = 1
lr_decay_steps = [3]
batch_size = 4
augment = false
feature_cache = true
[grid]
cases = [{mode = "linear"}, {mode = "full", augment = true, feature_cache = false}]
p = [0.0, 0.9]
lr = [0.05, 0.02]
"""


def _sweep(tmp_path, data_root):
    from linft.sweeps.grid import load_experiment
    (tmp_path / "tiny.toml").write_text(SWEEP)
    return load_experiment(str(tmp_path / "tiny.toml"), data_root=str(data_root), cache_dir=str(tmp_path / "cache"))


def _same_as_alone(exp, root, ref_root, tol=1e-5):
    # sweeps no longer force quiet (their logs get one line per evaluation): the reference runs as launched
    for cfg in exp.configs:
        assert_same_run(train(cfg, ref_root), RunDir(root, cfg), tol=tol)


def test_sweep_launch_vectorize(data_root, tmp_path, monkeypatch, capsys):
    """`linft sweep launch --vectorize 3`: the 4 linear runs train as groups of 3 + 1 (a lone run
    trains alone), the full runs alone (said so); every folder equals a separate run's."""
    from linft.cli.app import main
    from linft.sweeps.grid import plan
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp = _sweep(tmp_path, data_root)
    units = plan(exp.configs, 3, say=lambda s: None)
    assert sorted(len(u) for u in units) == [1, 1, 1, 1, 1, 3]
    (tmp_path / "tiny.toml").write_text(SWEEP)
    rc = main(["sweep", "launch", str(tmp_path / "tiny.toml"), "--root", str(tmp_path / "runs"), "--vectorize", "3",
               "--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0 and "done 8" in out
    assert "runs alone (mode 'full' trains the trunk" in out
    assert len(list((tmp_path / "runs" / ".sweep").glob("group-*.log"))) == 1
    _same_as_alone(exp, tmp_path / "runs", tmp_path / "ref")


def test_slurm_job_trains_a_group(data_root, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from linft.sweeps.slurm import SlurmOptions, TrainGroup, launch_slurm
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp = _sweep(tmp_path, data_root)
    exp.configs = [c for c in exp.configs if c.mode == "linear"][:3]
    jobs = launch_slurm(exp, tmp_path / "runs", SlurmOptions(cluster="local", time_min=10), vectorize=4)
    assert len(jobs) == 1
    assert jobs[0].result() == ["done"] * 3
    assert (tmp_path / "runs" / exp.configs[1].run_id / "slurm.out").is_symlink()
    _same_as_alone(exp, tmp_path / "runs", tmp_path / "ref")
    requeued = TrainGroup([c.to_dict() for c in exp.configs], "r").checkpoint()
    assert requeued.function.configs[0] == exp.configs[0].to_dict()


@pytest.mark.parametrize("shape,kw", [
    ((2, 6, 1, 1), dict(groups=6, padding=2, k=5)),             # a 1x1 map (the 32 px study): centre tap
    ((2, 6, 5, 5), dict(groups=6, padding=1, k=3)),             # depthwise, same padding
    ((2, 6, 6, 6), dict(groups=6, padding=2, k=5, stride=2)),   # depthwise, strided
    ((2, 6, 5, 5), dict(groups=1, padding=0, k=1)),             # pointwise
    ((2, 6, 6, 6), dict(groups=1, padding=0, k=1, stride=2)),   # pointwise, strided (a downsample)
    ((2, 6, 5, 5), dict(groups=1, padding=1, k=3)),             # anything else: torch's own
])
def test_vmap_convolutions_equal_torch(shape, kw):
    """The convolutions of the vectorised step (member-batched weights) equal F.conv2d, values and
    gradients, in float64."""
    from torch.func import vmap
    from linft.training import multirun
    k, groups, stride, padding = kw["k"], kw["groups"], kw.get("stride", 1), kw["padding"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=g)
    w = torch.randn(3, 6, 6 // groups, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)

    def run(conv):
        out = vmap(lambda x, w, b: conv(x, w, b, stride, padding, 1, groups))(x, w, b)
        return (out, *torch.autograd.grad((out ** 2).sum(), (w, b)))
    for got, ref in zip(run(multirun._vmap_conv2d), run(torch.nn.functional.conv2d)):
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12, rtol=0)
