"""The run options of the offline study: snapshot_steps (weights kept along training, single and
vectorised runs, rewritten equal on resume), probe_lr and probe_dropout (one shared probed head;
the vectorised group's probe memo), eval_limit (a fixed evaluation subset per trial_seed) and their
validation."""
import numpy as np
import pytest
import torch

from linft.analysis.loading import load_run
from linft.errors import ConfigError
from linft.runs.store import RunDir, load_checkpoint
from linft.training import group as group_mod
from linft.training.group import train_group
from linft.training.launch import train
from linft.training.pipeline import build_run, probe_head
from conftest import tiny_config
from test_vectorized import TOL, assert_same_run, data_root, float64, members, separately, tiny  # noqa: F401


def _snapshots(rd: RunDir) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for step, f in rd.snapshots().items():
        blob = load_checkpoint(f)
        assert blob["step"] == step
        out[step] = blob["trainable"]
    return out


def _equal(a: dict, b: dict, names=None) -> bool:
    names = a.keys() if names is None else names
    return set(names) <= set(b) and all(torch.equal(a[n], b[n]) for n in names)


def _close(a: dict, b: dict, tol=TOL) -> bool:
    """Equal to ``tol`` (float64): a vmapped step sums in another order than the single one, so the
    group's weights agree with a separate run's to ~1e-16, not bit for bit (test_vectorized's TOL)."""
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.allclose(a[n], b[n], atol=tol, rtol=0)
                                        for n in a)


# -- snapshot_steps ----------------------------------------------------------------------------
def test_snapshots_at_their_steps_hold_those_weights(data_root, tmp_path):
    """Step 0 is theta0 after the probe (as load_run rebuilds it), the last one final.pt's weights,
    and a middle one the final weights of the same run trained only that far."""
    kw = dict(mode="tail", head_init="probe", probe_steps=2, p=0.5, lr_decay_steps=(), steps=4, eval_every=2)
    rd = train(tiny_config(data_root, snapshot_steps=(0, 2, 4), **kw), tmp_path)
    snaps = _snapshots(rd)
    assert sorted(snaps) == [0, 2, 4] and sorted(p.name for p in rd.snapshot_dir.iterdir()) == [
        "step_000000.pt", "step_000002.pt", "step_000004.pt"]
    final = load_checkpoint(rd.final_path)["trainable"]
    assert snaps[4].keys() == final.keys() and _equal(final, snaps[4])
    run = load_run(rd.path)
    assert _equal(run.theta0, snaps[0], run.theta0) and not _equal(run.theta0, snaps[2], run.theta0)
    short = train(tiny_config(data_root, **{**kw, "steps": 2}), tmp_path)
    assert _equal(load_checkpoint(short.final_path)["trainable"], snaps[2])
    assert not short.snapshot_dir.exists()  # no snapshot_steps, no folder


@pytest.mark.parametrize("case", [dict(), dict(head_init="probe", probe_steps=3, probe_lr=0.3)])
def test_group_snapshots_equal_separate_runs(float64, data_root, tmp_path, case):
    cfgs = [c.replace(snapshot_steps=(0, 3, 5, 6)) for c in members(tiny(data_root, tmp_path, **case))]
    ref = separately(cfgs, tmp_path / "a")
    got = train_group(cfgs, tmp_path / "b")
    for a, b in zip(ref, got):
        assert_same_run(a, b)
        sa, sb = _snapshots(a), _snapshots(b)
        assert sorted(sa) == sorted(sb) == [0, 3, 5, 6]
        for s in sa:
            assert _close(sa[s], sb[s]), (a.path.name, s)
        assert _equal(sa[0], sb[0])  # theta0: no vmapped step yet, bit for bit
        assert _equal(load_checkpoint(b.final_path)["trainable"], sb[6])
    assert not _equal(_snapshots(got[0])[6], _snapshots(got[2])[6])  # the members really differ


class Kill(Exception):
    pass


def _kill_after_snapshot(monkeypatch, target_step):
    """Raise right after the snapshot of ``target_step`` is written (before the next checkpoint)."""
    orig = RunDir.save_snapshot

    def dying(self, step, state):
        orig(self, step, state)
        if step == target_step:
            raise Kill
    monkeypatch.setattr(RunDir, "save_snapshot", dying)
    return orig


def test_resumed_run_rewrites_equal_snapshots(data_root, tmp_path, monkeypatch):
    cfg = tiny_config(data_root, mode="tail", p=0.5, checkpoint_every=2, snapshot_steps=(1, 3, 5, 6))
    ref = _snapshots(train(cfg, tmp_path / "ref"))
    orig = _kill_after_snapshot(monkeypatch, 3)  # the last checkpoint is step 2: step 3 is trained again
    with pytest.raises(Kill):
        train(cfg, tmp_path / "killed")
    monkeypatch.setattr(RunDir, "save_snapshot", orig)
    rd = RunDir(tmp_path / "killed", cfg)
    assert sorted(rd.snapshots()) == [1, 3] and not rd.done
    first = rd.snapshot_path(3).stat().st_mtime_ns
    train(cfg, tmp_path / "killed")
    got = _snapshots(rd)
    assert sorted(got) == sorted(ref) and all(_equal(ref[s], got[s]) for s in ref)
    assert rd.snapshot_path(3).stat().st_mtime_ns != first  # rewritten, equal


def test_killed_group_rewrites_equal_snapshots(float64, data_root, tmp_path, monkeypatch):
    cfgs = [c.replace(snapshot_steps=(1, 3, 5), checkpoint_every=2) for c in members(tiny(data_root, tmp_path))]
    ref = separately(cfgs, tmp_path / "a")
    orig = _kill_after_snapshot(monkeypatch, 3)
    with pytest.raises(Kill):
        train_group(cfgs, tmp_path / "b")
    monkeypatch.setattr(RunDir, "save_snapshot", orig)
    for a, b in zip(ref, train_group(cfgs, tmp_path / "b")):
        assert_same_run(a, b)
        sa, sb = _snapshots(a), _snapshots(b)
        assert sorted(sa) == sorted(sb) == [1, 3, 5] and all(_close(sa[s], sb[s]) for s in sa)


# -- probe_lr, probe_dropout -------------------------------------------------------------------
def _probed_head(cfg) -> dict[str, torch.Tensor]:
    """The head after the probe, as the trainer and load_run make it (seeded right before probing)."""
    with torch.random.fork_rng(devices=[]):
        built = build_run(cfg)
        torch.manual_seed(cfg.seed)
        probe_head(cfg, built.data, built.pipe, built.device)
    return {n: t.detach().clone() for n, t in built.pipe.head.state_dict().items()}


def test_probe_lr_gives_every_lr_one_probed_head(data_root):
    base = tiny_config(data_root, mode="tail", head_init="probe", probe_steps=3, probe_dropout=False)
    default = [_probed_head(base.replace(lr=lr)) for lr in (0.05, 0.01)]
    assert not _equal(*default)  # 0: 10 x lr, so the heads differ
    shared = [_probed_head(base.replace(lr=lr, p=p, probe_lr=0.3)) for lr, p in ((0.05, 0.0), (0.01, 0.9))]
    assert _equal(*shared)  # probe_lr set, probe_dropout off: lr and p do not enter the probe
    assert _equal(_probed_head(base.replace(lr=0.03)), shared[0])  # probe_lr=0.3 is 10 x 0.03


def _probe_by_hand(cfg) -> dict[str, torch.Tensor]:
    """The probe of a tail run written out: SGD on the head alone over the probe stream, the head's
    input pooled, then dropout(p) (one mask per example and unit, the trainer's) only if probe_dropout."""
    import torch.nn.functional as F
    with torch.random.fork_rng(devices=[]):
        built = build_run(cfg)
        torch.manual_seed(cfg.seed)
        pipe, fc = built.pipe, built.pipe.head.fc
        opt = torch.optim.SGD(fc.parameters(), lr=cfg.probe_lr or 10 * cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        stream = built.data.train_batches(start=0, stream="probe")
        for _ in range(cfg.probe_steps):
            batches = next(stream)
            with torch.no_grad():
                h = pipe.split.tail(pipe.pre(torch.cat([b[0] for b in batches])))
                z = h.mean((2, 3)) if h.dim() == 4 else h
            if cfg.probe_dropout:
                z = F.dropout(z, cfg.p, training=True)
            loss = F.cross_entropy(fc(z), torch.cat([b[1] for b in batches]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {f"fc.{n}": t.detach().clone() for n, t in fc.state_dict().items()}


def test_probe_dropout_changes_the_probe(data_root):
    base = tiny_config(data_root, mode="tail", head_init="probe", probe_steps=3, probe_lr=0.3, probe_dropout=False)
    for cfg in (base.replace(p=0.5), base.replace(p=0.5, probe_dropout=True)):
        got, want = _probed_head(cfg), _probe_by_hand(cfg)
        assert got.keys() == want.keys() and all(torch.allclose(got[n], want[n], atol=1e-6, rtol=0) for n in got), \
            cfg.probe_dropout
    off = _probed_head(base.replace(p=0.5))
    on = _probed_head(base.replace(p=0.5, probe_dropout=True))
    assert not _equal(off, on)
    assert _equal(_probed_head(base.replace(p=0.0, probe_dropout=True)), _probed_head(base))  # p = 0: no-op
    assert not _equal(on, _probed_head(base.replace(p=0.9, probe_dropout=True)))


def test_group_probe_memo_keeps_members_equal_to_separate_runs(float64, data_root, tmp_path, monkeypatch):
    """Members (seed 0) with p 0, 0.5, 0.5 (other lr), 0.9 (probe_dropout off): one probe each
    for p=0 and p=0.5 with probe_dropout on; one probe for all with it off. Each equals its separate run."""
    calls = []
    orig = group_mod.probe_head

    def counted(cfg, *a, **kw):
        calls.append(cfg.p)
        return orig(cfg, *a, **kw)
    monkeypatch.setattr(group_mod, "probe_head", counted)
    for dropout, probes in ((True, [0.0, 0.5, 0.9]), (False, [0.0])):
        base = tiny(data_root, tmp_path, head_init="probe", probe_steps=3, probe_lr=0.3, probe_dropout=dropout,
                    snapshot_steps=(0,))
        cfgs = [base.replace(p=0.0), base.replace(p=0.5), base.replace(p=0.5, lr=0.02), base.replace(p=0.9)]
        calls.clear()
        got = train_group(cfgs, tmp_path / f"g{dropout}")
        assert calls == probes, dropout
        for a, b in zip(separately(cfgs, tmp_path / f"s{dropout}"), got):
            assert_same_run(a, b)
            assert _equal(_snapshots(a)[0], _snapshots(b)[0])  # the probed theta0, bit for bit
        heads = [_snapshots(b)[0] for b in got]
        assert _equal(heads[1], heads[2]) and _equal(heads[0], heads[3]) != dropout


# -- eval_limit --------------------------------------------------------------------------------
def _eval_subsets(cfg) -> tuple[dict, dict]:
    """(key -> eval indices, key -> the split's indices) of the run's data."""
    data = build_run(cfg).data
    splits = {(s.env, sp): np.asarray(s.indices(sp)) for s in data.splits for sp in ("in", "out")}
    out = {}
    for key, loader in data.eval_loaders.items():
        idx = getattr(loader, "indices", None)
        out[key] = np.asarray(idx if idx is not None else loader.dataset.indices)
    return out, splits


@pytest.mark.parametrize("cache", [False, True])
def test_eval_limit_is_a_fixed_subset_per_trial_seed(data_root, tmp_path, cache):
    kw = dict(mode="tail", eval_limit=4, feature_cache=cache, augment=False, cache_dir=str(tmp_path / "cache"))
    full, splits = _eval_subsets(tiny_config(data_root, **{**kw, "eval_limit": 0}))
    assert any(len(v) > 4 for v in full.values())
    a, sa = _eval_subsets(tiny_config(data_root, **kw))
    b, _ = _eval_subsets(tiny_config(data_root, **kw, seed=1, lr=0.01, p=0.5))
    assert a.keys() == full.keys() == b.keys()
    for k in a:
        assert len(a[k]) == min(4, len(full[k])) and set(a[k]) <= set(sa[k])
        assert np.array_equal(a[k], b[k])  # one trial_seed: one subset, whatever the training seed
    c, sc = _eval_subsets(tiny_config(data_root, **kw, trial_seed=1))
    assert all(len(c[k]) <= 4 for k in c)
    # positions inside the (equal-sized) splits: another trial_seed draws other examples, not only another split
    pos_a = {k: tuple(np.searchsorted(sa[k], a[k])) for k in a if len(sa[k]) > 4}
    pos_c = {k: tuple(np.searchsorted(sc[k], c[k])) for k in c if len(sc[k]) > 4}
    assert pos_a and any(pos_a[k] != pos_c.get(k) for k in pos_a)
    assert len({pos_a[k] for k in pos_a}) > 1  # and other examples per split


# -- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [(dict(probe_lr=-0.1), "probe_lr must be >= 0"),
                                    (dict(eval_limit=-1), "eval_limit must be >= 0"),
                                    (dict(snapshot_steps=(2, 7)), r"snapshot_steps must lie in \[0, steps=6\]"),
                                    (dict(snapshot_steps=(-1,)), "snapshot_steps must lie in")])
def test_invalid_values_are_one_line_config_errors(data_root, kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        tiny_config(data_root, **kw)
    assert "\n" not in str(e.value)


def test_invalid_value_on_the_command_line(data_root, tmp_path, capsys):
    from linft.cli.app import main
    rc = main(["train", "--root", str(tmp_path), "--data-root", str(data_root), "--dataset", "PACS",
               "--backbone", "tiny_resnet", "--steps", "3", "--snapshot-steps", "1,4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("linft: error:") and "snapshot_steps" in err


def test_load_run_theta0_from_the_step0_snapshot_equals_the_probe_replay(data_root, tmp_path):
    """load_run takes theta0 from snapshots/step_000000.pt when the run has it (no probe replay);
    without it, the replay must give the same tensors bit for bit (LP-FT under dropout p = 0.5)."""
    cfg = tiny_config(data_root, mode="tail", head_init="probe", probe_steps=3, p=0.5, snapshot_steps=(0,))
    rd = train(cfg, tmp_path / "runs")
    from_snapshot = load_run(rd.path).theta0
    (rd.path / "snapshots" / "step_000000.pt").rename(tmp_path / "step0.pt")
    replayed = load_run(rd.path).theta0
    assert from_snapshot.keys() == replayed.keys()
    assert all(torch.equal(from_snapshot[n], replayed[n]) for n in replayed)


def test_unfolded_on_a_backbone_with_a_neck_has_a_head_of_the_blocks_width():
    """EfficientNet's tail is blocks (320 units) + a neck to 1280: Eq. 1 sums the blocks' own pooled
    outputs, so the unfolded model's head takes 320 inputs (it used to get the 1280-wide head and
    fail at the first forward)."""
    from linft.runs.config import RunConfig
    from linft.training.pipeline import build_pipeline
    cfg = RunConfig(dataset="Digits", backbone="efficientnet_lite0.random", mode="unfolded", k=1, resolution=32)
    pipe = build_pipeline(cfg, 10, torch.device("cpu"))
    with torch.no_grad():
        out = pipe.trainable(pipe.post(pipe.pre(torch.zeros(2, 3, 32, 32))))
    assert out.shape == (2, 10) and pipe.trainable.head.fc.in_features == 320


def test_unfolded_with_a_probed_head_is_refused():
    from linft.runs.config import RunConfig
    with pytest.raises(ConfigError, match="head_init=probe is not supported"):
        RunConfig(mode="unfolded", head_init="probe")


def test_trained_pair_accepts_a_standard_run_with_snapshots(data_root, tmp_path):
    """A study's standard tail keeps snapshots and its linearized twin does not: the trained-pair
    analysis compares them anyway (snapshot_steps changes no weight)."""
    from linft.analysis.registry import analyze
    base = tiny_config(data_root, head_init="probe", probe_steps=3, probe_dropout=False)
    tail = train(base.replace(mode="tail", snapshot_steps=(0, 2)), tmp_path / "runs").path
    lin = train(base.replace(mode="linear"), tmp_path / "runs").path
    rows = analyze("linearity", [str(lin), str(tail)])
    assert {r["metric"] for r in rows} >= {"acc_gap", "agreement"}
