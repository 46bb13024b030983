"""The offline study (linft.results.study, study_claims, study_plots): intervals against scipy,
the convergence rule on constructed curves, each claim's verdict on synthetic rows, exclusions,
missing data, and `linft study` writing its files."""
import math
import zlib

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from linft.results import study as st
from linft.results import study_claims as sc

BASE = dict(dataset="Digits", k=1, lr=5e-4, weight_decay=1e-4, last_layer_lr_mult=1.0, trial_seed=0, resolution=48,
            augment=False, batch_size=32, test_env="optdigits")
ARMS = {"tail": ("tail", "efficientnet_lite0.in1k", "probe"), "linear": ("linear", "efficientnet_lite0.in1k", "probe"),
        "random trunk": ("tail", "efficientnet_lite0.random", "probe")}
STEPS = 1000
EVALS = (0, 250, 500, 750, 1000)
NS = (100, 300, 1000, 3000)


def noise(*key, scale=0.3) -> float:
    """A fixed pseudo-random number per key (no process-dependent hashing)."""
    return scale * (zlib.crc32(repr(key).encode()) % 2001 - 1000) / 1000


def run_rows(run, arm="tail", p=0.0, n=100, seed=0, steps=STEPS, ood=None, iid=None, loss=0.05, state="done",
             rel_err=None, kernel=None, **cfg):
    """The rows load_rows gives for one run: eval rows of three models at EVALS, train losses, and
    (when given) linearity and ntk analysis rows with decoys of other t / role / form.
    ``iid``: a list over EVALS (percent) or a number (flat); ``ood``: a number or {model: number}."""
    mode, backbone, head = ARMS[arm]
    iid = list(iid) if isinstance(iid, (list, tuple)) else [90.0 if iid is None else iid] * len(EVALS)
    ood = ood if isinstance(ood, dict) else {"current": 50.0 if ood is None else ood}
    ood = {m: ood.get(m, ood["current"]) for m in st.MODELS}
    rows = []
    for step, acc in zip([e * steps // STEPS for e in EVALS], iid):
        for model in st.MODELS:
            rows += [dict(kind="eval", model=model, env="mnist", role="train", split="out", metric="acc", step=step,
                          value=acc / 100),
                     dict(kind="eval", model=model, env="mnist", role="train", split="in", metric="acc", step=step,
                          value=1.0),
                     dict(kind="eval", model=model, env="optdigits", role="test", split="in", metric="acc", step=step,
                          value=ood[model] / 100),
                     dict(kind="eval", model=model, env="optdigits", role="test", split="out", metric="acc",
                          step=step, value=0.0)]
        if step:
            rows.append(dict(kind="train", metric="loss", step=step, value=loss))
    if rel_err is not None:
        rows += [dict(kind="linearity", analysis="linearity-a", definition="posthoc", t=t, env=env, role=role,
                      metric="rel_err_l2", value=rel_err + (t != 1.0) + 5 * (role != "train"))
                 for t in (0.5, 1.0) for env, role in (("pooled", "train"), ("pooled", "test"), ("mnist", "train"))]
    if kernel is not None:
        rows += [dict(kind="ntk", analysis="ntk-a", form=f, env="pooled", role="train", metric="kernel_distance",
                      value=kernel + 7 * (f != "full")) for f in ("full", "trace")]
    cfg = {**BASE, **cfg, "mode": mode, "backbone": backbone, "head_init": head, "p": p, "n_per_domain": n,
           "seed": seed, "steps": steps}
    return [dict(r, run=run, state=state, **cfg) for r in rows]


def frame(ood=None, rel=None, ker=None, arms=("tail",), ps=(0.0, 0.9), ns=NS, seeds=range(5), extra=()):
    """A whole study: ``ood(arm, p, n, seed, model)`` in percent; ``rel``/``ker`` (arm, p, n, seed)."""
    rows = []
    for arm in arms:
        for p in ps:
            for n in ns:
                for s in seeds:
                    o = {m: ood(arm, p, n, s, m) for m in st.MODELS} if ood else None
                    rows += run_rows(f"{arm}-{p}-{n}-{s}", arm, p, n, s, ood=o,
                                     rel_err=rel(arm, p, n, s) if rel else None,
                                     kernel=ker(arm, p, n, s) if ker else None)
    for r in extra:
        rows += r
    df = pd.DataFrame(rows)
    return df


def verdicts(df, fixed_steps=STEPS, epochs=None):
    runs = st.runs_table(df, fixed_steps, epochs)
    conv = st.convergence(df, runs)
    vals = st.values(df, runs, conv)
    table, paired, notes = sc.claims(vals)
    keys = ["a", "b", "c", "d", "d0", "e", "f"]  # the table's order; d0: claim (d) at p=0 (reported)
    return dict(zip(keys, table["verdict"])), table, paired, notes, vals


def test_interval_is_the_t_interval_of_scipy():
    x = np.array([1.3, -0.2, 0.7, 2.1, 0.4])
    iv = st.interval(x)
    lo, hi = stats.t.interval(0.95, df=4, loc=x.mean(), scale=stats.sem(x))
    assert iv["n_seeds"] == 5 and iv["mean"] == pytest.approx(x.mean())
    assert (iv["lo"], iv["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    assert iv["half"] == pytest.approx(2.7764451051977987 * x.std(ddof=1) / math.sqrt(5), rel=1e-12)
    assert math.isnan(st.interval([1.0])["half"]) and st.interval([])["n_seeds"] == 0
    assert st.interval([1.0, np.nan, 3.0])["n_seeds"] == 2


def test_slope_is_least_squares_in_log10_n():
    n, y = np.array([100, 300, 1000, 3000]), np.array([1.0, 0.2, -0.5, -2.0])
    assert st.slope(n, y) == pytest.approx(stats.linregress(np.log10(n), y).slope, rel=1e-12)
    assert math.isnan(st.slope([100, 100], [1, 2]))


@pytest.mark.parametrize("iid,loss,converged,why", [
    ([80, 88, 89.5, 90, 90], 0.05, True, ""),
    ([80, 88, 91, 90.6, 90], 0.05, True, ""),          # 1.0 below the second-half best: still converged
    ([80, 88, 92, 91, 90], 0.05, False, "below its second-half best"),
    ([80, 85, 87, 89, 90], 0.05, False, "rose 1.00 points"),  # a rise of exactly 1.0 is not "less than 1"
    ([80, 88, 90, 90, 90], float("nan"), False, "train loss"),
    ([15, 18, 19, 19, 19], 0.05, False, "chance"),
    ([75, 10, 21, 21, 21], 0.05, False, "collapsed"),  # an LP-FT start that fell and stayed (48 px pilot)
    ([75, 70, 66, 66, 66], 0.05, True, ""),            # 9 points below its start: not a collapse
])
def test_convergence_rule_on_constructed_curves(iid, loss, converged, why):
    df = pd.DataFrame(run_rows("r", iid=iid, loss=loss))
    conv = st.convergence(df, st.runs_table(df, STEPS, None))
    assert bool(conv["converged"].iloc[0]) is converged
    assert why in conv["why"].iloc[0]
    assert conv["step_2_3"].iloc[0] == 750  # the evaluation nearest 2/3 of 1000 steps


def test_unfinished_run_is_not_converged():
    df = pd.DataFrame(run_rows("r", state="running"))
    df = df[df["step"] <= 750]
    conv = st.convergence(df, st.runs_table(df, STEPS, None))
    assert not conv["converged"].iloc[0] and "state running" in conv["why"].iloc[0] and "< 1000" in conv["why"].iloc[0]


def test_protocols_classify_runs_by_their_steps():
    rows = run_rows("a", n=100, steps=1000) + run_rows("b", n=3200, steps=1000) + run_rows("c", n=3000, steps=4688) \
        + run_rows("d", n=300, steps=777)
    runs = st.runs_table(pd.DataFrame(rows), 1000, 10)  # 10 epochs of 3200 = 1000 steps; of 3000 = 937.5
    got = runs.groupby("run")["protocol"].agg(set).to_dict()
    assert got == {"a": {"fixed-steps"}, "b": {"fixed-steps", "fixed-epochs"}, "c": {"steps=4688"},
                   "d": {"steps=777"}}
    runs = st.runs_table(pd.DataFrame(run_rows("e", n=3000, steps=938)), 1000, 10)
    assert list(runs["protocol"]) == ["fixed-epochs"]


def _a(delta):
    return lambda arm, p, n, s, m: 50 + noise(arm, p, n, s, m) + (delta(n) if p == 0.9 else 0)


@pytest.mark.parametrize("delta,verdict", [
    (lambda n: 3.0, "reproduced"),
    (lambda n: -3.0, "contradicted"),
    (lambda n: {100: 3.0, 300: -3.0}.get(n, 0.0), "inconclusive"),
])
def test_claim_a(delta, verdict):
    v, table, paired, _, _ = verdicts(frame(_a(delta)))
    assert v["a"] == verdict
    row = table[table["claim"].str.startswith("(a)")].iloc[0]
    assert "n=100:" in row["numbers"] and "(S=5)" in row["numbers"] and row["excluded_runs"] == 0 and row["seeds"] == "5"
    d = paired[(paired["claim"] == "a") & (paired["n"] == 100)]
    assert len(d) == 5 and np.allclose(d["diff"], d["value_a"] - d["value_b"])


@pytest.mark.parametrize("avg,ens,verdict", [(0.0, 0.0, "reproduced"), (0.0, 6.0, "contradicted"),
                                             (0.0, 3.0, "inconclusive")])
def test_claim_b(avg, ens, verdict):
    def ood(arm, p, n, s, m):
        if p == 0.9:
            return 53 + noise(arm, p, n, s, m)
        return 50 + noise(arm, p, n, s, m) + {"current": 0.0, "traj_avg": avg, "traj_ens": ens}[m]
    assert verdicts(frame(ood))[0]["b"] == verdict


@pytest.mark.parametrize("k,verdict", [(-2.0, "reproduced"), (2.0, "contradicted"), (0.0, "inconclusive")])
def test_claim_c_and_best_p(k, verdict):
    v, _, paired, _, vals = verdicts(frame(_a(lambda n: k * (math.log10(n) - 2.5))))
    assert v["c"] == verdict
    slopes = paired[(paired["claim"] == "c") & paired["slope"].notna()]
    assert len(slopes) == 5 and slopes["slope"].mean() == pytest.approx(k, abs=0.5)
    best = sc.best_p(vals).set_index("n")["best_p"]
    if k < 0:
        assert best[100] == 0.9 and best[3000] == 0.0


@pytest.mark.parametrize("g,verdict", [(lambda n: 2 * math.log10(n / 100), "reproduced"),
                                       (lambda n: 5.0 + math.log10(n), "contradicted"),
                                       (lambda n: 0.0, "inconclusive"),
                                       (lambda n: -2 * math.log10(n / 100), "contradicted")])
def test_claim_d(g, verdict):
    def ood(arm, p, n, s, m):
        return 50 + noise(arm, p, n, s, m) + (g(n) if arm == "tail" else 0)
    v = verdicts(frame(ood, arms=("tail", "linear")))[0]
    assert v["d"] == verdict and v["d0"] == verdict


@pytest.mark.parametrize("rk,kk,verdict", [(0.1, 0.05, "reproduced"), (0.1, -0.05, "contradicted"),
                                           (0.1, 0.0, "inconclusive")])
def test_claim_e(rk, kk, verdict):
    def rel(arm, p, n, s):
        return 0.2 + rk * math.log10(n) + noise("r", arm, p, n, s, scale=0.01)

    def ker(arm, p, n, s):
        return 0.3 + kk * math.log10(n) + noise("k", arm, p, n, s, scale=0.01)
    assert verdicts(frame(rel=rel, ker=ker))[0]["e"] == verdict


@pytest.mark.parametrize("gap,verdict", [(lambda n: 0.3, "reproduced"), (lambda n: 0.3 if n < 1000 else -0.3,
                                                                        "contradicted"),
                                         (lambda n: 0.3 if n < 1000 else 0.0, "inconclusive")])
def test_claim_f(gap, verdict):
    def rel(arm, p, n, s):
        return 0.2 + noise("r", arm, p, n, s, scale=0.02) + (gap(n) if arm == "random trunk" else 0)
    assert verdicts(frame(rel=rel, ps=(0.0,), arms=("tail", "random trunk")))[0]["f"] == verdict


def test_non_converged_run_is_excluded_and_counted():
    df = frame(_a(lambda n: 3.0))
    bad = (df["run"] == "tail-0.9-100-0") & (df["kind"] == "eval") & (df["role"] == "train") & (df["split"] == "out")
    df.loc[bad & (df["step"] == 1000), "value"] = 0.95  # a 5-point rise after 2/3 of the steps
    v, table, paired, _, vals = verdicts(df)
    row = table[table["claim"].str.startswith("(a)")].iloc[0]
    assert row["excluded_runs"] == 1 and v["a"] == "reproduced" and row["seeds"] == "4-5"
    assert set(paired[(paired["claim"] == "a") & (paired["n"] == 100)]["seed"]) == {1, 2, 3, 4}
    cell = st.cells(vals).query("arm == 'tail' and p == 0.9 and n == 100 and model == 'current'").iloc[0]
    assert cell["ood_n_seeds"] == 4 and cell["ood_n_excluded"] == 1


def test_missing_arms_and_seeds_are_inconclusive_with_the_reason():
    v, table, _, _, _ = verdicts(frame(_a(lambda n: 3.0), seeds=range(1)))  # one seed: no interval anywhere
    assert all(x.startswith("inconclusive (missing") for x in v.values())
    v = verdicts(frame(_a(lambda n: 3.0), ns=(100,)))[0]  # tail only, one size
    assert v["a"].startswith("inconclusive (missing: tail p=0.9 vs p=0 at n=300, 1000")
    assert v["d"].startswith("inconclusive (missing") and "n=100" in v["d"]
    assert v["e"].startswith("inconclusive (missing") and v["f"].startswith("inconclusive (missing")


def test_runs_differing_in_more_than_the_seed_are_never_pooled():
    extra = [run_rows(f"lr-{s}", p=0.9, n=100, seed=s, ood=90.0, lr=1e-3) for s in range(5)]
    _, _, paired, notes, vals = verdicts(frame(_a(lambda n: 3.0), extra=extra))
    assert any("several settings" in n and "n=100" in n for n in notes)
    assert not ((paired["claim"] == "a") & (paired["n"] == 100)).any()
    cells = st.cells(vals).query("arm == 'tail' and p == 0.9 and n == 100 and model == 'current'")
    assert len(cells) == 2 and sorted(cells["ood_n_seeds"]) == [5, 5]


def test_cli_writes_the_study(tmp_path, capsys):
    from linft.cli.app import main
    from linft.runs.config import RunConfig
    from linft.runs.store import RunDir
    root = tmp_path / "runs"
    for arm in ("tail", "linear"):
        for p in (0.0, 0.9):
            for n in (100, 300):
                for s in range(2):
                    cfg = RunConfig(dataset="Digits", backbone="efficientnet_lite0.in1k", mode=arm, head_init="probe",
                                    p=p, n_per_domain=n, seed=s, steps=STEPS, augment=False, feature_cache=True,
                                    test_envs=("optdigits",), lr_decay_steps=(500,), eval_every=250, traj_start=250,
                                    k=1)
                    rd = RunDir(root, cfg)
                    rd.path.mkdir(parents=True)
                    rd.create()
                    keep = set(BASE) | {"mode", "backbone", "head_init", "p", "n_per_domain", "seed", "steps",
                                        "run", "state"}
                    rd.append_rows([{k: v for k, v in r.items() if k not in keep}
                                    for r in run_rows(rd.path.name, arm, p, n, s, ood=50 + 3 * p + noise(arm, p, n, s))])
                    rd.mark_done()
    out = tmp_path / "out"
    assert main(["study", str(root), "--out", str(out), "--fixed-steps", str(STEPS), "--epochs", "10",
                 "--curves-n", "100"]) == 0
    for name in ("claims.md", "cells.csv", "paired.csv", "convergence.csv", "figures/ood_vs_n.png",
                 "figures/curves_fixed-steps_n100.png", "figures/curves_fixed-steps_n300.csv"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "claims.md").read_text()
    assert "| (a) p=0.9 improves" in text and "16 runs, 0 not converged" in text
    conv = pd.read_csv(out / "convergence.csv")
    assert len(conv) == 16 and conv["converged"].all()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["study", str(tmp_path / "empty"), "--fixed-steps", "1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linft: error: no run folders") and err.count("\n") == 1


def test_measures_pick_posthoc_t1_pooled_iid_and_the_full_kernel():
    df = pd.DataFrame(run_rows("r", rel_err=0.25, kernel=0.125) + run_rows("s"))
    m = st.measures(df).set_index(["run", "quantity"])["value"]
    assert m.to_dict() == {("r", "rel_err_l2"): 0.25, ("r", "kernel_distance"): 0.125}
    assert st.measures(pd.DataFrame(run_rows("s"))).empty


def test_linearity_and_trajectory_figures(tmp_path):
    from linft.results import study_plots
    df = frame(_a(lambda n: 1.0), rel=lambda *k: 0.2 + noise(*k, scale=0.01), ker=lambda *k: 0.1 + noise(*k, scale=0.01),
               arms=("tail", "random trunk"), ps=(0.0,), ns=(100, 300), seeds=range(2))
    own = df.drop_duplicates("run")
    tr = [dict(r, kind="trajectory", analysis="trajectory-a", step=step, metric=m, value=step / 1000 + noise(r["run"], m),
               env="pooled", form=form) for r in own.drop(columns=["kind", "metric", "value", "step"]).to_dict("records")
          for step in (0, 250, 1000) for m in study_plots.TRAJ_METRICS for form in ("full", "trace")]
    short = pd.DataFrame(run_rows("short", p=0.0, n=100, steps=300))  # neither protocol: its own curves figure
    df = pd.concat([df, pd.DataFrame(tr), short], ignore_index=True)
    runs = st.runs_table(df, STEPS, None)
    conv = st.convergence(df, runs)
    vals = st.values(df, runs, conv)
    res = {"rows": df, "runs": runs, "convergence": conv, "values": vals, "cells": st.cells(vals)}
    paths = study_plots.figures(res, tmp_path, curves_n=100)
    names = {p.name for p in paths}
    assert {"linearity_vs_n.png", "trajectory.png", "ood_vs_n.png", "curves_fixed-steps_n100.png",
            "curves_fixed-steps_n300.png", "curves_steps=300_n100.png"} <= names
    traj = pd.read_csv(tmp_path / "trajectory.csv")
    assert set(traj["step"]) == {250, 1000} and set(traj["n_seeds"]) == {2}  # log x: step 0 left out; full form only
    assert set(traj["metric"]) == set(study_plots.TRAJ_METRICS)


def test_claim_f_size_with_one_seed_has_no_interval():
    def rel(arm, p, n, s):
        return 0.2 + noise("r", arm, p, n, s, scale=0.02) + (0.3 if arm == "random trunk" else 0)
    df = frame(rel=rel, ps=(0.0,), arms=("tail", "random trunk"), ns=(100, 300))
    df = df[~df["run"].str.startswith("random trunk-0.0-300-") | df["run"].str.endswith("-0")]
    v = verdicts(df)[0]["f"]
    assert v.startswith("inconclusive (missing: n=300")


def test_claim_f_needs_every_trained_size_not_only_the_converged_ones():
    """The random trunk trained at every size but converged at some only: 'every size' is not met."""
    def rel(arm, p, n, s):
        return 0.2 + noise("r", arm, p, n, s, scale=0.02) + (0.3 if arm == "random trunk" else 0)
    df = frame(rel=rel, ps=(0.0,), arms=("tail", "random trunk"))
    big = df["run"].str.startswith("random trunk") & df["run"].str.contains(f"-{NS[-1]}-") & (df["kind"] == "eval") \
        & (df["role"] == "train") & (df["split"] == "out")
    df.loc[big & (df["step"] == 1000), "value"] = 0.97  # a 7-point rise at the end: not converged
    got = verdicts(df)[0]["f"]
    assert got.startswith("inconclusive") and f"n={NS[-1]}" in got, got
