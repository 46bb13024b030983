"""The ``trajectory`` analysis on tiny real runs with snapshots, evaluated in float64: at the last
snapshot (== the final weights) it reproduces linearity's t = 1 rows and ntk's kernel distance; the
weight distance is a direct torch computation; at step 0 everything vanishes."""
import math

import pytest
import torch

from linft.analysis.loading import load_run
from linft.analysis.registry import analysis_dir, analyze
from linft.data.synthetic import make_image_tree
from linft.errors import LinftError
from linft.runs.store import load_checkpoint
from linft.training.launch import train
from conftest import SHORT, tiny_config

F64 = dict(dtype="float64", probe_size=8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trajectory")
    make_image_tree(root / "data", "PACS", n_per_class=5, size=16)

    def tiny(**kw):
        return train(tiny_config(root / "data", **{**SHORT, **kw}), root / "runs").path
    return dict(tail=tiny(mode="tail", p=0.5, snapshot_steps=(0, 2, 4)),
                tail_mid=tiny(mode="tail", snapshot_steps=(1, 3)),
                plain=tiny(mode="tail"), lin=tiny(mode="linear", snapshot_steps=(0, 2)))


def _at(rows, step, metric, **kw):
    got = [r for r in rows if r["step"] == step and r["metric"] == metric and all(r.get(k) == v for k, v in kw.items())]
    assert len(got) == 1, (step, metric, kw, len(got))
    return got[0]["value"]


def _fidelity(rows, **kw):
    keys = ("r2", "agreement", "rel_err_l2", "rel_err_l1", "residual_l2", "residual_l1")
    return {(r["env"], r["role"], r["split"], r["metric"]): r["value"] for r in rows
            if r["metric"] in keys and all(r.get(k) == v for k, v in kw.items())}


@pytest.mark.parametrize("form", ["full", "trace"])
def test_last_snapshot_matches_linearity_and_ntk(runs, form):
    rows = analyze("trajectory", [runs["tail"]], form=form, **F64)
    assert {r["kind"] for r in rows} == {"trajectory"} and sorted({r["step"] for r in rows}) == [0, 2, 4]
    assert all(r["definition"] == "posthoc" and r["form"] == form and r["probe_size"] == 8 for r in rows)
    lin = _fidelity(analyze("linearity", [runs["tail"]], ts=(1.0,), dtype="float64"), t=1.0)
    mine = _fidelity(rows, step=4)
    assert mine.keys() == lin.keys() and len(mine) >= 6 * 3
    for k, v in lin.items():
        assert math.isclose(mine[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, mine[k], v)
    ntk = analyze("ntk", [runs["tail"]], form=form, **F64)
    for metric in ("kernel_distance",) + (("kernel_distance_trace",) if form == "full" else ()):
        want = next(r["value"] for r in ntk if r["metric"] == metric)
        assert math.isclose(_at(rows, 4, metric), want, rel_tol=1e-9, abs_tol=1e-15), metric
    assert _at(rows, 2, "kernel_distance") > 0


def test_weight_distance_is_the_direct_norm(runs):
    rows = analyze("trajectory", [runs["tail"]], **F64)
    run = load_run(runs["tail"], dtype="float64")
    norm0 = math.sqrt(sum(float((t.double() ** 2).sum()) for t in run.theta0.values()))
    for step in (2, 4):
        snap = load_checkpoint(runs["tail"] / "snapshots" / f"step_{step:06d}.pt")["trainable"]
        d = math.sqrt(sum(float(((snap[n].double() - run.theta0[n]) ** 2).sum()) for n in run.theta0))
        assert d > 0
        assert math.isclose(_at(rows, step, "weight_distance"), d, rel_tol=1e-12)
        assert math.isclose(_at(rows, step, "weight_distance_relative"), d / norm0, rel_tol=1e-12)


def test_step_zero_has_not_moved(runs):
    rows = analyze("trajectory", [runs["tail"]], **F64)
    assert _at(rows, 0, "weight_distance") == 0.0
    assert abs(_at(rows, 0, "kernel_distance")) < 1e-12
    fid = _fidelity(rows, step=0)
    for (env, role, split, metric), v in fid.items():
        if metric.startswith("residual"):
            assert v < 1e-12
        if metric.startswith("rel_err"):  # fidelity's 0/0 = 0 (x/0 = inf for a last-bit Taylor primal)
            assert v in (0.0, math.inf), (env, split, metric, v)
        if metric == "agreement":
            assert v == 1.0


def test_final_weights_are_the_last_step_without_a_snapshot_there(runs):
    rows = analyze("trajectory", [runs["tail_mid"]], **F64)
    assert sorted({r["step"] for r in rows}) == [1, 3, 4]
    ntk = analyze("ntk", [runs["tail_mid"]], form="full", **F64)
    want = next(r["value"] for r in ntk if r["metric"] == "kernel_distance")
    assert math.isclose(_at(rows, 4, "kernel_distance"), want, rel_tol=1e-9, abs_tol=1e-15)


def test_max_examples_subsets_every_split(runs):
    import json
    analyze("trajectory", [runs["tail"]], **F64)
    analyze("trajectory", [runs["tail"]], max_examples=4, **F64)
    sizes = json.loads((analysis_dir("trajectory", [runs["tail"]], dict(max_examples=4, **F64)) / "config.json")
                       .read_text())["examples_per_split"]
    full = json.loads((analysis_dir("trajectory", [runs["tail"]], F64) / "config.json").read_text())
    full = full["examples_per_split"]
    assert sizes.keys() == full.keys() and any(n > 4 for n in full.values())
    assert all(sizes[k] == min(4, full[k]) for k in full)


def test_steps_option_and_a_run_without_snapshots(runs):
    """``steps`` keeps only those points, each with the numbers of the whole analysis; a run without
    snapshots has its final weights alone (step == steps)."""
    last = analyze("trajectory", [runs["tail"]], steps=(4,), **F64)
    assert {r["step"] for r in last} == {4}
    whole = analyze("trajectory", [runs["tail"]], **F64)

    def by_key(rows):
        return {(r["metric"], r.get("env"), r.get("role"), r.get("split")): r["value"] for r in rows if r["step"] == 4}
    a, b = by_key(last), by_key(whole)
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-15) for k in a)
    plain = analyze("trajectory", [runs["plain"]], **F64)
    assert {r["step"] for r in plain} == {SHORT["steps"]} and _at(plain, SHORT["steps"], "kernel_distance") > 0


def test_refusals(runs):
    with pytest.raises(LinftError, match="has no snapshot at step"):
        analyze("trajectory", [runs["tail"]], steps=(3,))
    with pytest.raises(LinftError, match="linearized run.*kernel is constant"):
        analyze("trajectory", [runs["lin"]])
    with pytest.raises(LinftError, match="unknown option"):
        analyze("trajectory", [runs["tail"]], weights="traj_avg")


def test_cli(runs, capsys):
    from linft.cli.app import main
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "trajectory" in capsys.readouterr().out
    assert main(["analyze", "trajectory", "--run", str(runs["tail"]), "--probe-size", "8", "--form", "trace"]) == 0
    out = capsys.readouterr().out
    assert "analyses/trajectory-" in out and "kernel_distance" in out and "step=2" in out
    assert main(["analyze", "trajectory", "--run", str(runs["tail"]), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("linft: error:") and "no snapshot at step" in err
