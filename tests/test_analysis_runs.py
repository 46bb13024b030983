"""linft.analysis end to end on tiny real runs (generated PACS tree, tiny_resnet, 16 px)."""
import hashlib
import json

import pytest
import torch

import linft.analysis.loading as an
from linft.analysis.loading import load_run
from linft.analysis.registry import analysis_dir, analyze
from linft.data.synthetic import make_image_tree
from linft.errors import LinftError
from linft.training.evaluate import metrics, predict
from linft.training.launch import train
from conftest import SHORT, tiny_config

ROW_KEYS = {"run", "kind", "metric", "value"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    make_image_tree(root / "data", "PACS", n_per_class=5, size=16)

    def tiny(**kw):
        return train(tiny_config(root / "data", **{**SHORT, **kw}), root / "runs").path
    return dict(tail=tiny(mode="tail"), tail_p=tiny(mode="tail", p=0.5), lin=tiny(mode="linear"),
                lin_p=tiny(mode="linear", p=0.5), other_seed=tiny(mode="tail", seed=1),
                tail_probe=tiny(mode="tail", head_init="probe", probe_steps=2),
                lin_probe=tiny(mode="linear", head_init="probe", probe_steps=2),
                tail_n=tiny(mode="tail", n_per_domain=10), root=root)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _pooled(rows, **kw):
    return [r for r in rows if r.get("env") == "pooled" and all(r.get(k) == v for k, v in kw.items())]


def test_theta0_is_rebuilt_exactly(runs):
    """A linearized run stores theta0; rebuilding a tail run of the same seed gives the same
    tensors (also when the head was linear-probed first: the probe is re-run identically)."""
    for std, lin in (("tail", "lin"), ("tail_probe", "lin_probe")):
        a, b = load_run(runs[std]), load_run(runs[lin])
        assert a.theta0.keys() == b.theta0.keys()
        assert all(torch.equal(a.theta0[n], b.theta0[n]) for n in a.theta0), std
    assert load_run(runs["tail_probe"]).theta0_head == "probe" and load_run(runs["tail"]).theta0_head == "init:random"
    with pytest.raises(LinftError, match="does not exist"):
        load_run(runs["root"] / "nope")


def test_every_kind_end_to_end_and_nothing_is_modified(runs):
    before = {k: _digest(runs[k]) for k in ("tail", "tail_p", "lin", "lin_p")}
    jobs = [("distance", ["tail"]), ("distance", ["tail", "tail_p"]), ("interp", ["tail"]), ("interp", ["tail", "tail_p"]),
            ("funcinterp", ["tail", "tail_p"]), ("identity", ["tail", "tail_p"]), ("linearity", ["tail"]),
            ("linearity", ["lin"]), ("linearity", ["lin", "tail"]), ("ntk", ["tail"]), ("ntk", ["lin"])]
    out = {}
    for kind, names in jobs:
        rows = analyze(kind, [runs[n] for n in names])
        assert rows and all(ROW_KEYS <= set(r) and r["kind"] == kind for r in rows), kind
        folder = analysis_dir(kind, [runs[n] for n in names], {})
        assert folder.parent == runs[names[0]] / "analyses"
        out[(kind, *names)] = rows
    for k, d in before.items():
        assert _digest(runs[k]) == d, k  # run folders untouched (analyses live in a subfolder)
    # distance: the tail run moved; the head's theta0 is its init; two runs: cosine in [-1, 1]
    tot = [r for r in out[("distance", "tail")] if r["level"] == "total"]
    assert {r["metric"] for r in tot} == {"distance", "norm0", "relative"} and all(r["value"] > 0 for r in tot)
    assert {r["theta0"] for r in out[("distance", "tail")] if r["layer"] == "1.fc"} == {"init:random"}
    cos = [r for r in out[("distance", "tail", "tail_p")] if r["metric"] == "delta_cosine" and r["level"] == "total"]
    assert len(cos) == 1 and -1 <= cos[0]["value"] <= 1 and cos[0]["theta0_shared"] == "all"
    # interp: both barrier definitions on loss and error, endpoints in the grid, bn policy everywhere
    rows = out[("interp", "tail")]
    assert all(r["bn_policy"] == "frozen" for r in rows) and {r["head_at_0"] for r in rows} == {"init"}
    bars = _pooled(rows, metric="loss_barrier")
    assert {r["definition"] for r in bars} == {"line", "mean"} and all(r["value"] >= 0 for r in bars if r["definition"] == "line")
    assert {0.0, 1.0} <= {r["alpha"] for r in rows if "alpha" in r}
    # funcinterp: logit mixture = weights at the endpoints; all four models present
    fi = _pooled(out[("funcinterp", "tail", "tail_p")], metric="logit_gap_rel", model="logit_mix")
    assert {r["alpha"]: r["value"] for r in fi}[0.0] == 0.0 and {r["alpha"]: r["value"] for r in fi}[1.0] == 0.0
    assert {r["model"] for r in out[("funcinterp", "tail", "tail_p")]} == {"weights", "logit_mix", "prob_mix", "rep_mix"}
    # linearity: halving ratios and per-split rows; trained-linear vs standard
    lin_rows = out[("linearity", "tail")]
    assert _pooled(lin_rows, metric="halving_ratio_l2", t=1.0) and {r["t"] for r in lin_rows} == {0.25, 0.5, 1.0}
    assert all(0.9 < r["value"] <= 1 for r in _pooled(lin_rows, metric="r2", t=0.25))
    pair = out[("linearity", "lin", "tail")]
    assert {r["metric"] for r in pair} >= {"acc_gap", "agreement"} and pair[0]["endpoint_a"].startswith("linear:")
    # ntk: a linearized run's kernel does not move; a tail run's does (a little)
    kd = {name: [r["value"] for r in out[("ntk", name)] if r["metric"] == "kernel_distance"][0] for name in ("tail", "lin")}
    assert abs(kd["lin"]) < 1e-6 and 0 < kd["tail"] < 0.1
    assert [r["definition"] for r in out[("linearity", "lin")]][0] == "network_at_linear_theta"


def test_interp_endpoints_reproduce_the_models_exactly(runs):
    rows = analyze("interp", [runs["tail"], runs["tail_p"]], refine=False, grid=3)
    at = {(r["env"], r["split"], r["metric"], r["alpha"]): r["value"] for r in rows if "alpha" in r}
    for alpha, name in ((0.0, "tail"), (1.0, "tail_p")):
        r = load_run(runs[name])
        t = r.trainer
        for key, loader in t.data.eval_loaders.items():
            logits, y = predict(t.pipe.pre, t.pipe.post, t.pipe.trainable, loader, t.device)
            m = metrics(logits, y)
            assert at[(*key, "loss", alpha)] == m["loss"] and at[(*key, "acc", alpha)] == m["acc"]
    # pre-trained -> fine-tuned: a = 1 is the run's own final evaluation in results.jsonl
    rows = analyze("interp", [runs["tail"]], grid=3, refine=False)
    final = [json.loads(x) for x in (runs["tail"] / "results.jsonl").read_text().splitlines()]
    final = {(r["env"], r["split"], r["metric"]): r["value"] for r in final
             if r.get("kind") == "eval" and r["model"] == "current" and r["step"] == 4}
    for r in rows:
        if r.get("alpha") == 1.0 and r["env"] != "pooled":
            assert r["value"] == final[(r["env"], r["split"], r["metric"])]


def test_identities_hold_for_linearized_runs_in_float64(runs):
    rows = analyze("identity", [runs["lin"], runs["lin_p"]], dtype="float64")
    for r in _pooled(rows):
        if r["metric"] in ("midpoint_gap_rel", "max_gap_rel"):
            assert r["value"] < 1e-10, r
        if r["metric"] == "loss_barrier":
            assert r["value"] <= 1e-12
    nonlin = analyze("identity", [runs["tail"], runs["tail_p"]], dtype="float64")
    assert max(r["value"] for r in _pooled(nonlin, metric="midpoint_gap_rel")) > 1e-6
    kd = [r for r in analyze("ntk", [runs["lin"]], dtype="float64") if r["metric"] == "kernel_distance"]
    assert abs(kd[0]["value"]) < 1e-12


def test_no_mutation_of_loaded_models(runs):
    r = load_run(runs["tail"])
    state = {k: v.clone() for k, v in r.trainable.state_dict().items()}
    from linft.analysis import funcinterp, interp, linearity, ntk
    interp.interp([r], grid=3)
    funcinterp.funcinterp([r], grid=3)
    linearity.linearity([r])
    ntk.ntk([r], probe_size=4)
    assert all(torch.equal(state[k], v) for k, v in r.trainable.state_dict().items())
    assert r.trainable.training is False


def test_complete_analyses_are_read_back_not_recomputed(runs, monkeypatch):
    first = analyze("distance", [runs["tail_p"]])
    folder = analysis_dir("distance", [runs["tail_p"]], {})
    mtime = (folder / "rows.jsonl").stat().st_mtime_ns
    assert (folder / "done").exists() and json.loads((folder / "config.json").read_text())["kind"] == "distance"

    def boom(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(an, "load_run", boom)
    assert analyze("distance", [runs["tail_p"]]) == first
    assert (folder / "rows.jsonl").stat().st_mtime_ns == mtime
    # other options -> another folder (and a recomputation)
    assert analysis_dir("interp", [runs["tail"]], {"grid": 5}) != analysis_dir("interp", [runs["tail"]], {"grid": 7})
    assert analysis_dir("ntk", [runs["tail"]], {"device": "cuda"}) == analysis_dir("ntk", [runs["tail"]], {})


def test_errors_and_cli(runs, monkeypatch, capsys):
    with pytest.raises(LinftError, match="do not share theta0"):
        analyze("distance", [runs["tail"], runs["other_seed"]])
    with pytest.raises(LinftError, match="unknown option"):
        analyze("interp", [runs["tail"]], grdi=3)
    import linft.cli.commands
    from linft.cli import analyze as analyze_cli
    from linft.cli import app as cli
    orig = linft.cli.commands.register_all

    def register_all(sub):  # until linft/commands.py registers `analyze` itself
        orig(sub)
        if "analyze" not in sub.choices:
            analyze_cli.register(sub)
    monkeypatch.setattr(linft.cli.commands, "register_all", register_all)
    for argv, msg in ((["--run", str(runs["root"] / "missing")], "does not exist"),
                      (["--run", str(runs["tail"]), "--run", str(runs["other_seed"])], "do not share theta0")):
        assert cli.main(["analyze", "distance", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and err.startswith("linft: error:")
    assert cli.main(["analyze", "interp", "--run", str(runs["tail"]), "--grid", "3", "--no-refine"]) == 0
    out = capsys.readouterr().out
    assert "loss_barrier" in out and "analyses/interp-" in out


def size_trend(runs, **options):
    return analyze("trend", runs, **options)


def test_size_trend(runs):
    rows = size_trend([runs["tail_n"], runs["tail"]], kinds=("distance", "linearity", "ntk"))
    ns = sorted({r["n"] for r in rows})  # n: "in" examples per training domain (the smallest domain)
    assert len(ns) == 2 and ns[0] == 10 < ns[1] and all(r["kind"] == "trend" for r in rows)
    assert {r["n_per_domain"] for r in rows if r["n"] == ns[1]} == {0}
    assert {r["metric"] for r in rows} >= {"distance_relative", "linearity_r2", "ntk_kernel_distance"}
    with pytest.raises(LinftError, match="differs"):
        size_trend([runs["tail"], runs["other_seed"]])


def test_size_trend_passes_each_option_only_where_it_applies(runs):
    rows = size_trend([runs["tail_n"], runs["tail"]], kinds=("distance", "ntk"), probe_size=8)
    assert {r["metric"] for r in rows} >= {"distance_relative", "ntk_kernel_distance"}
