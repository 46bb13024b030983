"""The offline study's figures (definitions: :mod:`linft.results.study`), each saved by
:func:`linft.results.plots.save` as PNG + PDF + the CSV of what it shows, with a caption naming the
data, backbone, steps, seeds and the interval. Cells and lines never pool runs that differ in
anything but the seed; intervals are 95% t-intervals over converged seeds."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from linft.results import plots
from linft.results import study as st

CI_TEXT = "error bars: 95% t-interval over seeds, mean +- t(0.975, S-1) sd / sqrt(S), converged runs only"
TRAJ_METRICS = ("rel_err_l2", "weight_distance", "kernel_distance")


def _caption(what: str, data: pd.DataFrame, ci: str = CI_TEXT) -> str:
    return f"{what}; {ci}.\n{plots.provenance(data)}"


def _label(arm, p, setting) -> str:
    return f"{arm} p={p:g}" + (f" {setting}" if setting else "")


def curves_figure(res: dict, n: int, protocol: str, out_dir) -> list[Path]:
    """iid (solid) and ood (dashed) accuracy vs step, one line per seed, a panel per
    (arm, p, setting) present."""
    runs = res["runs"]
    runs = runs[(runs["n"] == n) & (runs["protocol"] == protocol)]
    if runs.empty:
        return []
    c = st.curves(res["rows"])
    c = c[c["model"] == "current"].merge(runs[["run", "arm", "p", "n", "seed", "setting", "dataset", "backbone",
                                               "steps"]], on="run")
    c = c.merge(res["convergence"][["run", "converged"]], on="run", how="left")
    panels = list(dict.fromkeys(runs.sort_values(["arm", "p", "setting"])[["arm", "p", "setting"]]
                                .itertuples(index=False, name=None)))
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for i, (arm, p, setting) in enumerate(panels):
        ax = axes.flat[i]
        g = c[(c["arm"] == arm) & (c["setting"] == setting) & (c["p"] == p)]
        for k, (seed, s) in enumerate(g.groupby("seed")):
            s = s.sort_values("step")
            colour = plots.COLORBLIND[k % len(plots.COLORBLIND)]
            mark = "" if s["converged"].fillna(False).all() else " (not converged)"
            ax.plot(s["step"], s["iid"], "-", color=colour, lw=1, label=f"seed {seed}{mark}")
            ax.plot(s["step"], s["ood"], "--", color=colour, lw=1)
        ax.set_title(_label(arm, p, setting), fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        if i % ncol == 0:
            ax.set_ylabel("accuracy (%)", fontsize=7)
        if len(g):
            ax.legend(fontsize=5, frameon=False)
    cap = _caption(f"training curves at n={n} ({protocol}): i.i.d. (solid, training domain's held-out split) and "
                   "o.o.d. (dashed, test domain) accuracy of the current model, one line per seed", c,
                   "no intervals (one line per seed)")
    return plots.save(fig, c, out_dir, f"curves_{protocol}_n{n}", cap)


def _errorbars(ax, t: pd.DataFrame, q: str, style: dict) -> None:
    for (arm, p, setting), g in t.groupby(["arm", "p", "setting"]):
        g = g.sort_values("n")
        err = np.vstack([g[f"{q}_mean"] - g[f"{q}_lo"], g[f"{q}_hi"] - g[f"{q}_mean"]]).clip(min=0)
        colour, marker = style[(arm, p)]
        ax.errorbar(g["n"], g[f"{q}_mean"], yerr=np.nan_to_num(err), fmt=marker, color=colour, ms=4,
                    capsize=2, lw=1, ls="-" if arm == "tail" else "--", label=_label(arm, p, setting))
    ax.set_xscale("log")
    ax.set_xlabel("n (training examples per domain)")


def _style(t: pd.DataFrame) -> dict:
    ps = sorted(t["p"].unique())
    arms = sorted(t["arm"].unique())
    return {(a, p): (plots.COLORBLIND[ps.index(p) % 10], plots.MARKERS[arms.index(a) % len(plots.MARKERS)])
            for a in arms for p in ps}


def ood_vs_n_figure(res: dict, out_dir) -> list[Path]:
    """ood accuracy vs n per p for tail and linear; a panel per protocol (fixed-steps, fixed-epochs)."""
    cells = res["cells"]
    if cells.empty or "ood_mean" not in cells:
        return []
    t = cells[cells["arm"].isin(["tail", "linear"]) & (cells["model"] == "current")
              & cells["protocol"].isin([st.FIXED_STEPS, st.FIXED_EPOCHS])].dropna(subset=["ood_mean"])
    if t.empty:
        return []
    protos = [p for p in (st.FIXED_STEPS, st.FIXED_EPOCHS) if p in set(t["protocol"])]
    fig, axes = plt.subplots(1, len(protos), figsize=(5.0 * len(protos), 3.6), squeeze=False, sharey=True)
    style = _style(t)
    for ax, proto in zip(axes[0], protos):
        _errorbars(ax, t[t["protocol"] == proto], "ood", style)
        ax.set_title(proto, fontsize=9)
        ax.set_ylabel("o.o.d. accuracy (%)")
    plots._legend_outside(axes[0][-1], "arm")
    data = t.merge(res["values"][["arm", "protocol", "n", "dataset", "backbone", "steps", "seed"]].drop_duplicates(),
                   on=["arm", "protocol", "n"])
    cap = _caption("o.o.d. accuracy (test domain, final step, current model) vs n; solid: tail, dashed: linear", data)
    return plots.save(fig, t, out_dir, "ood_vs_n", cap)


def linearity_figure(res: dict, out_dir) -> list[Path]:
    """rel_err_l2 and kernel distance vs n, pretrained tail vs random trunk (fixed-steps)."""
    cells = res["cells"]
    qs = [q for q in ("rel_err_l2", "kernel_distance") if f"{q}_mean" in cells]
    if not qs:
        return []
    t = cells[cells["arm"].isin(["tail", "random trunk"]) & (cells["protocol"] == st.FIXED_STEPS)
              & (cells["model"] == "current")]
    t = t.dropna(subset=[f"{q}_mean" for q in qs], how="all")
    if t.empty:
        return []
    fig, axes = plt.subplots(1, len(qs), figsize=(4.6 * len(qs), 3.4), squeeze=False)
    style = _style(t)
    for ax, q in zip(axes[0], qs):
        _errorbars(ax, t.dropna(subset=[f"{q}_mean"]), q, style)
        ax.set_ylabel({"rel_err_l2": "rel_err_l2 (Taylor residual / function change, t=1)",
                       "kernel_distance": "kernel distance (full form)"}[q], fontsize=7)
    plots._legend_outside(axes[0][-1], "arm")
    v = res["values"]
    data = v[v["quantity"].isin(qs) & v["arm"].isin(["tail", "random trunk"])]
    cap = _caption("linearity vs n (fixed-steps): rel_err_l2 = ||f - f_lin|| / ||f - f0|| (posthoc, pooled i.i.d. "
                   "held-out split) and NTK kernel distance theta0 -> theta_ft; solid: pretrained tail, dashed: "
                   "random trunk", data)
    return plots.save(fig, t, out_dir, "linearity_vs_n", cap)


def _traj_rows(res: dict) -> pd.DataFrame:
    df = res["rows"]
    if "kind" not in df or not (df["kind"] == "trajectory").any():
        return pd.DataFrame()
    tr = df[(df["kind"] == "trajectory") & df["metric"].isin(TRAJ_METRICS)]
    parts = []
    for m, g in tr.groupby("metric"):
        for col, want in (("env", "pooled"), ("role", "train"), ("form", "full"), ("level", "total"), ("t", 1.0),
                          ("definition", "posthoc")):
            if col in g and (g[col] == want).any():
                g = g[g[col] == want]
        parts.append(g)
    if not parts:
        return pd.DataFrame()
    tr = pd.concat(parts)[["run", "step", "metric", "value"]]
    runs = res["runs"][res["runs"]["protocol"] == st.FIXED_STEPS]
    tr = tr.merge(runs[["run", "arm", "p", "n", "seed", "setting", "dataset", "backbone", "steps"]], on="run")
    return tr.merge(res["convergence"][["run", "converged"]], on="run")


def trajectory_figure(res: dict, out_dir) -> list[Path]:
    """rel_err_l2, weight distance and kernel distance vs step (log x), one line per n (seed mean,
    95% t-band), a column per (arm, p, setting); fixed-steps runs."""
    tr = _traj_rows(res)
    if tr.empty:
        return []
    tr = tr[tr["converged"] & (tr["step"] > 0)]
    if tr.empty:
        return []
    metrics = [m for m in TRAJ_METRICS if m in set(tr["metric"])]
    cols = list(dict.fromkeys(zip(tr["arm"], tr["p"], tr["setting"])))
    fig, axes = plt.subplots(len(metrics), len(cols), figsize=(3.4 * len(cols), 2.6 * len(metrics)), squeeze=False)
    ns = sorted(tr["n"].unique())
    summary = []
    for j, (arm, p, setting) in enumerate(cols):
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            g = tr[(tr["arm"] == arm) & (tr["p"] == p) & (tr["setting"] == setting) & (tr["metric"] == m)]
            for n, gn in g.groupby("n"):
                iv = pd.DataFrame([{"step": s, **st.interval(x["value"])} for s, x in gn.groupby("step")])
                colour = plots.COLORBLIND[ns.index(n) % 10]
                ax.plot(iv["step"], iv["mean"], "-o", ms=2, color=colour, lw=1, label=f"n={n}")
                ax.fill_between(iv["step"], iv["lo"], iv["hi"], color=colour, alpha=0.2, lw=0)
                summary.append(iv.assign(arm=arm, p=p, setting=setting, metric=m, n=n))
            ax.set_xscale("log")
            ax.set_title(f"{_label(arm, p, setting)}: {m}", fontsize=7)
            ax.set_xlabel("step", fontsize=7)
            if len(g):
                ax.legend(fontsize=5, frameon=False)
    cap = _caption("along the trajectory (fixed-steps): Taylor rel_err_l2, weight distance and kernel distance "
                   "theta0 -> snapshot, vs step; one line per n (band: interval over seeds)", tr)
    return plots.save(fig, pd.concat(summary, ignore_index=True), out_dir, "trajectory", cap)


def figures(res: dict, out_dir, curves_n: int = 1000, fixed_steps=None, epochs=None) -> list[Path]:
    out_dir = Path(out_dir)
    paths = []
    runs = res["runs"]
    sizes = sorted({curves_n, int(runs["n"].max())}) if len(runs) else []
    for n in sizes:  # the two protocols, then any other step count at that n (e.g. short full fine-tuning)
        here = set(runs.loc[runs["n"] == n, "protocol"])
        for proto in [st.FIXED_STEPS, st.FIXED_EPOCHS] + sorted(here - {st.FIXED_STEPS, st.FIXED_EPOCHS}):
            paths += curves_figure(res, n, proto, out_dir)
    for fn in (ood_vs_n_figure, linearity_figure, trajectory_figure):
        paths += fn(res, out_dir)
    return paths
