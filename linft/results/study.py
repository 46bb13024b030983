"""The offline study's numbers: per-run final accuracies, the convergence rule, intervals over
seeds and the paired differences behind each claim (paper_notes.md, "the offline study"; [ZB]
Sec. 4-5). Every function takes and returns DataFrames; the verdicts are in
:mod:`linft.results.study_claims`, the figures in :mod:`linft.results.study_plots`.

Definitions (accuracies in percent, differences in points):

- **arm**: from the run's config: ``random trunk`` (a ``*.random`` backbone; ``random trunk <mode>``
  for modes other than tail), ``random head <mode>`` (head_init=random, modes tail/linear/full/
  unfolded), else the mode (``tail`` and ``linear`` with head_init=probe: LP-FT; ``probe``,
  ``unfolded``, ``full``). n = ``n_per_domain`` (0, "all", is replaced by ``n_all`` when given).
- **protocol**: not a config field. A run is *fixed-steps* when its steps equal ``fixed_steps`` and
  *fixed-epochs* when |steps - epochs * n / batch_size| <= 0.5 (the rounded step count); a run may
  belong to both (where the two coincide), and one that is neither is ``steps=<S>``.
- **cell**: arm, protocol, p, n, model and the other config fields (``setting``: those of lr,
  weight decay, k, resolution, batch size, ... that vary in the study). Only seeds are averaged;
  runs that differ in anything else are never pooled.
- **ood** = accuracy on the test domains' "in" split, **iid** = accuracy on the training domains'
  "out" split (each the mean over its domains), at the run's final evaluation (runs are trained to
  convergence: no step selection), model ``current`` unless said (``traj_avg``, ``traj_ens``:
  [ZB] Sec. 5's trajectory average and ensemble).
- **converged**: the run finished (state done, last evaluation at its ``steps``), its final iid is no
  more than ``tol`` = 1.0 point below the best iid of the second half of training (evaluations at
  step >= last/2), it rose by less than ``tol`` between the evaluation nearest 2/3 of the steps
  (the last one excluded) and the end, its final train loss (mean since the previous evaluation) is
  finite, its final iid exceeds chance + 10 points, and (a run whose step-0 iid already exceeds
  that: an LP-FT start) it has not collapsed: its final iid is at most 10 points below its step-0
  iid (at 48 px p = 0.9 at too large a step falls from ~75% to ~21% and stays). Only converged runs enter a cell, a paired
  difference or a verdict; the others are listed with the reason and counted.
- **interval**: over seeds only: mean +- t_{0.975, S-1} * sd(ddof=1) / sqrt(S) for S seeds (none
  for S < 2); a comparison of two arms is the interval of the per-seed paired difference (same
  seed, same n, same protocol). Different n, p or arms are never pooled.
- **rel_err_l2** = ||f - f_lin|| / ||f - f0|| (the fraction of the function change the Taylor model
  misses), from the linearity analysis: definition posthoc, t = 1, env pooled, role train (the
  training domains' held-out split, where the NTK probe is drawn; ``fidelity_role="test"``: the
  test domains). **kernel distance**: ntk analysis, form full. Per run, from its final weights.
- **slope vs n**: per seed, the least-squares slope of a quantity against log10 n over the sizes
  that seed has; the interval is over the seeds' slopes.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from linft.results.collect import CONFIG_COLUMNS

FIXED_STEPS, FIXED_EPOCHS = "fixed-steps", "fixed-epochs"
MODELS = ("current", "traj_avg", "traj_ens")
TOL = 1.0            # points: the plateau tolerance of the convergence rule
ABOVE_CHANCE = 10.0  # points above chance a converged run's iid must exceed
COLLAPSE = 10.0      # points: a run that starts above chance + 10 (an LP-FT head) may not end this far below it
_ARM_FIELDS = ("mode", "backbone", "head_init", "p", "n_per_domain", "seed", "steps")
SETTING_FIELDS = tuple(c for c in (*CONFIG_COLUMNS, "test_env") if c not in _ARM_FIELDS)


def arm_of(mode: str, backbone: str, head_init: str) -> str:
    if str(backbone).endswith(".random"):
        return "random trunk" if mode == "tail" else f"random trunk {mode}"
    if head_init == "random" and mode != "probe":
        return f"random head {mode}"
    return str(mode)


def protocols_of(steps: int, n: int, batch_size: int, fixed_steps: int | None, epochs: float | None) -> list[str]:
    out = []
    if fixed_steps is not None and int(steps) == int(fixed_steps):
        out.append(FIXED_STEPS)
    if epochs is not None and n > 0 and abs(int(steps) - epochs * n / batch_size) <= 0.5:
        out.append(FIXED_EPOCHS)
    return out or [f"steps={int(steps)}"]


def interval(values) -> dict:
    """mean, the 95% t-interval over the values (seeds) and their number S (half = nan for S < 2)."""
    v = np.asarray(pd.Series(values, dtype=float).dropna(), dtype=float)
    s = len(v)
    mean = float(v.mean()) if s else math.nan
    half = float(stats.t.ppf(0.975, s - 1) * v.std(ddof=1) / math.sqrt(s)) if s >= 2 else math.nan
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half, "n_seeds": s}


def slope(n, y) -> float:
    """Least-squares slope of y against log10 n (nan with fewer than two distinct sizes)."""
    x, y = np.log10(np.asarray(n, dtype=float)), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 2:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _own(df: pd.DataFrame) -> pd.DataFrame:
    """The runs' own rows (not those of the analyses living under them)."""
    return df[df["analysis"].isna()] if "analysis" in df else df


def runs_table(df: pd.DataFrame, fixed_steps: int | None, epochs: float | None, n_all: int | None = None) -> pd.DataFrame:
    """One row per (run, protocol): run, arm, protocol, p, n, seed, steps, state, setting and the
    config columns."""
    own = _own(df)
    cols = [c for c in (*CONFIG_COLUMNS, "test_env", "state") if c in own]
    runs = own.groupby("run", sort=True)[cols].first().reset_index()
    if runs.empty:
        return runs.assign(arm=[], n=[], protocol=[], setting=[])
    runs["arm"] = [arm_of(m, b, h) for m, b, h in zip(runs["mode"], runs["backbone"], runs["head_init"])]
    n = runs["n_per_domain"].astype(int)
    runs["n"] = n.where(n > 0, n_all) if n_all else n
    bs = runs["batch_size"] if "batch_size" in runs else pd.Series(32, index=runs.index)
    runs["protocol"] = [protocols_of(s, k, b, fixed_steps, epochs) for s, k, b in zip(runs["steps"], runs["n"], bs)]
    vary = [c for c in SETTING_FIELDS if c in runs and runs[c].astype(str).nunique() > 1]
    runs["setting"] = [" ".join(f"{c}={r[c]}" for c in vary) for _, r in runs.iterrows()]
    return runs.explode("protocol", ignore_index=True)


def _eval_acc(df: pd.DataFrame) -> pd.DataFrame:
    """run, model, step, iid, ood (percent) at every evaluation."""
    ev = _own(df)
    ev = ev[(ev["kind"] == "eval") & (ev["metric"] == "acc")]
    keys = ["run", "model", "step"]
    ood = ev[(ev["role"] == "test") & (ev["split"] == "in")].groupby(keys)["value"].mean().rename("ood")
    iid = ev[(ev["role"] == "train") & (ev["split"] == "out")].groupby(keys)["value"].mean().rename("iid")
    out = pd.concat([iid, ood], axis=1).reset_index()
    out[["iid", "ood"]] *= 100.0
    return out


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation's iid and ood accuracy (percent), per run, model and step."""
    return _eval_acc(df)


def final_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """run, model, step (the run's last evaluation), iid, ood."""
    acc = _eval_acc(df)
    if acc.empty:
        return acc
    last = acc.groupby("run")["step"].transform("max")
    return acc[acc["step"] == last].reset_index(drop=True)


def convergence(df: pd.DataFrame, runs: pd.DataFrame, chance: float = 10.0, tol: float = TOL) -> pd.DataFrame:
    """Every run (and protocol): its final iid/ood, the two deltas of the convergence rule and
    whether it converged (``why``: the reasons it did not)."""
    acc = _eval_acc(df)
    cur = acc[acc["model"] == "current"]
    own = _own(df)
    loss = own[(own["kind"] == "train") & (own["metric"] == "loss")]
    curve_of = {k: g.sort_values("step") for k, g in cur.groupby("run")}
    loss_of = {k: g for k, g in loss.groupby("run")}
    none = cur.iloc[:0]
    out = []
    for r in runs.drop_duplicates("run").itertuples(index=False):
        c = curve_of.get(r.run, none)
        rec = {"run": r.run, "arm": r.arm, "p": r.p, "n": r.n, "seed": r.seed, "steps": r.steps, "state": r.state,
               "setting": r.setting}
        why = [] if r.state == "done" else [f"state {r.state}"]
        if c.empty or c["iid"].isna().all():
            out.append({**rec, "converged": False, "why": "; ".join(why + ["no iid evaluation"])})
            continue
        last = int(c["step"].max())
        final = c[c["step"] == last].iloc[0]
        best = float(c.loc[c["step"] >= last / 2, "iid"].max())
        earlier = c[c["step"] < last]
        s23 = None
        if not earlier.empty:
            s23 = int(earlier.iloc[int(np.argmin(np.abs(earlier["step"].to_numpy() - 2 * last / 3)))]["step"])
        rise = round(float(final["iid"] - c.loc[c["step"] == s23, "iid"].iloc[0]), 9) if s23 is not None else math.nan
        lo = loss_of.get(r.run, loss.iloc[:0])
        lo = lo.loc[lo["step"] == last, "value"]
        train_loss = float(lo.iloc[-1]) if len(lo) else math.nan
        drop = round(best - float(final["iid"]), 9)  # percent of fractions: 91.00000000000001 - 90 is 1
        if last < int(r.steps):
            why.append(f"last evaluation at step {last} < {int(r.steps)}")
        if not drop <= tol:
            why.append(f"iid {drop:.2f} points below its second-half best")
        if s23 is None:
            why.append("a single evaluation")
        elif not rise < tol:
            why.append(f"iid rose {rise:.2f} points since step {s23}")
        if not math.isfinite(train_loss):
            why.append("final train loss " + ("missing" if not len(lo) else f"{train_loss}"))
        if not float(final["iid"]) > chance + ABOVE_CHANCE:
            why.append(f"iid {final['iid']:.1f} <= chance + {ABOVE_CHANCE:g}")
        start = c.loc[c["step"] == 0, "iid"]
        if len(start) and float(start.iloc[0]) > chance + ABOVE_CHANCE and \
                float(final["iid"]) < float(start.iloc[0]) - COLLAPSE:
            why.append(f"collapsed: iid {final['iid']:.1f} vs {float(start.iloc[0]):.1f} at step 0")
        out.append({**rec, "final_step": last, "iid": float(final["iid"]), "ood": float(final["ood"]),
                    "best_iid_second_half": best, "drop_from_best": drop, "step_2_3": s23,
                    "rise_since_2_3": rise, "train_loss": train_loss, "converged": not why, "why": "; ".join(why)})
    conv = pd.DataFrame(out)
    return runs.groupby("run")["protocol"].agg(",".join).reset_index().merge(conv, on="run") if len(conv) else conv


def measures(df: pd.DataFrame, fidelity_role: str = "train") -> pd.DataFrame:
    """Per run, at its final weights: rel_err_l2 (definition posthoc, env pooled, role
    ``fidelity_role``: train = the training domains' held-out split) and kernel_distance (form
    full), from the trajectory analysis's rows at the run's last step where it has them (the same
    example subset and probe for every run), else from linearity (t=1) and ntk; the mean if several
    analyses of one source give it."""
    empty = pd.DataFrame(columns=["run", "quantity", "value"])
    if "kind" not in df:
        return empty

    traj = df[df["kind"] == "trajectory"]
    if len(traj) and {"step", "steps"} <= set(traj):  # the final weights' rows only
        traj = traj[pd.to_numeric(traj["step"]) == pd.to_numeric(traj["steps"])]

    def pick(frame: pd.DataFrame, metric: str, **where) -> pd.Series:
        part = frame[frame["metric"] == metric]
        for col, value in where.items():
            if col not in part:
                return pd.Series(dtype=float)
            part = part[pd.to_numeric(part[col], errors="coerce") == value] if isinstance(value, float) \
                else part[part[col] == value]
        return part.groupby("run")["value"].mean()

    fid = dict(definition="posthoc", env="pooled", role=fidelity_role)
    rel = pick(traj, "rel_err_l2", **fid).combine_first(pick(df[df["kind"] == "linearity"], "rel_err_l2", t=1.0, **fid))
    ker = pick(traj, "kernel_distance", form="full").combine_first(
        pick(df[df["kind"] == "ntk"], "kernel_distance", form="full"))
    parts = [x.rename(q) for x, q in ((rel, "rel_err_l2"), (ker, "kernel_distance")) if len(x)]
    if not parts:
        return empty
    m = pd.concat(parts, axis=1).rename_axis("run").reset_index()
    return m.melt(id_vars="run", var_name="quantity", value_name="value").dropna(subset=["value"])


def values(df: pd.DataFrame, runs: pd.DataFrame, conv: pd.DataFrame, fidelity_role: str = "train") -> pd.DataFrame:
    """The long table every cell and comparison is drawn from: one row per run, protocol, model
    and quantity (ood, iid, rel_err_l2, kernel_distance), with ``converged``."""
    fin = final_accuracy(df)
    acc = fin.melt(id_vars=["run", "model", "step"], value_vars=["ood", "iid"], var_name="quantity") \
        if len(fin) else pd.DataFrame(columns=["run", "model", "step", "quantity", "value"])
    m = measures(df, fidelity_role).assign(model="current")
    long = pd.concat([acc.drop(columns="step"), m], ignore_index=True)
    keys = runs[["run", "arm", "protocol", "p", "n", "seed", "setting", "dataset", "backbone", "steps"]]
    out = keys.merge(long, on="run").merge(conv[["run", "converged"]], on="run", how="left")
    out["converged"] = out["converged"].astype("boolean").fillna(False).astype(bool)
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    return out


def cells(vals: pd.DataFrame) -> pd.DataFrame:
    """Every cell (arm, protocol, p, n, setting, model): mean and 95% CI over converged seeds of
    ood and iid (and rel_err_l2 / kernel_distance where measured), seeds and excluded runs."""
    keys = ["arm", "protocol", "p", "n", "setting", "model"]
    out = []
    for key, g in vals.groupby(keys, sort=True):
        rec = dict(zip(keys, key))
        for q, gq in g.groupby("quantity", sort=False):
            iv = interval(gq.loc[gq["converged"], "value"])
            rec.update({f"{q}_{k}": iv[k] for k in ("mean", "lo", "hi", "n_seeds")})
            rec[f"{q}_n_excluded"] = int((~gq["converged"]).sum())
        out.append(rec)
    return pd.DataFrame(out)
