"""Figures of the analyses (:mod:`linft.analysis.registry`), each a function of the tidy frame; an
analysis names its figure (a function here, or its own callable) and :func:`make_all` draws them all."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from linft.results.plots import save


def _label(df: pd.DataFrame) -> dict[str, str]:
    own = df[df["analysis"].isna()] if "analysis" in df else df
    runs = (own if not own.empty else df).drop_duplicates("run").set_index("run")
    return {r: f"{row['mode']} p={row['p']:g}" for r, row in runs.iterrows() if isinstance(row["mode"], str)}


def _endpoint(name, labels) -> str:
    kind, _, run = str(name).partition(":")
    return labels.get(run, run) if kind == "ft" else f"{kind} {labels.get(run, '')}".strip()


def interpolation_curves(df: pd.DataFrame, out_dir, name: str = "interpolation") -> list[Path]:
    """Loss and 0-1 error along (1-a) theta_A + a theta_B, i.i.d. and o.o.d., with the barriers
    (max above the straight line between the endpoint values) in the legend."""
    rows = df[(df["kind"] == "interp") & (df["env"] == "pooled")].copy()
    if rows.empty:
        return []
    labels = _label(df)
    rows["path"] = [f"{_endpoint(a, labels)} -> {_endpoint(b, labels)}" for a, b in zip(rows["endpoint_a"], rows["endpoint_b"])]
    rows["data"] = rows["role"].map({"train": "i.i.d.", "test": "o.o.d."})
    curves = rows[rows["metric"].isin(["loss", "acc"])].copy()
    curves.loc[curves["metric"] == "acc", "value"] = 1 - curves.loc[curves["metric"] == "acc", "value"]
    curves["metric"] = curves["metric"].map({"loss": "loss", "acc": "0-1 error"})
    bars = rows[rows["metric"].isin(["loss_barrier", "error_barrier"]) & (rows["definition"] == "line")]
    paths = sorted(curves["path"].unique())
    fig, axes = plt.subplots(2, len(paths), figsize=(4.2 * len(paths), 6), squeeze=False)
    for j, path in enumerate(paths):
        for i, metric in enumerate(["loss", "0-1 error"]):
            ax = axes[i, j]
            part = curves[(curves["path"] == path) & (curves["metric"] == metric)].sort_values("alpha")
            for data, d in part.groupby("data"):
                b = bars[(bars["path"] == path) & (bars["data"] == data) &
                         (bars["metric"] == ("loss_barrier" if metric == "loss" else "error_barrier"))]["value"]
                ax.plot(d["alpha"], d["value"], marker=".", label=f"{data} (barrier {b.iloc[0]:.3f})" if len(b) else data)
            ax.set_xlabel("alpha")
            ax.set_ylabel(metric)
            ax.set_title(path if i == 0 else "", fontsize=9)
            ax.legend(fontsize=7)
    return save(fig, rows, out_dir, name)


def taylor_fidelity(df: pd.DataFrame, out_dir, name: str = "taylor_fidelity") -> list[Path]:
    """Post-hoc linearization of each standard run along theta0 + t (theta_ft - theta0):
    relative error |f - f_lin| / |f - f0| and prediction agreement, i.i.d. and o.o.d."""
    rows = df[(df["kind"] == "linearity") & (df["env"] == "pooled") & df["metric"].isin(["rel_err_l2", "agreement"])
              & df.get("t", pd.Series(index=df.index, dtype=float)).notna()].copy()
    if rows.empty:
        return []
    rows["run_label"] = rows["run"].map(_label(df))
    rows["data"] = rows["role"].map({"train": "i.i.d.", "test": "o.o.d."})
    g = sns.relplot(data=rows, x="t", y="value", hue="run_label", style="data", col="metric", kind="line",
                    marker="o", height=3.3, aspect=1.1, facet_kws={"sharey": False})
    return save(g.figure, rows, out_dir, name)


def trend(df: pd.DataFrame, out_dir, name: str = "size_trend") -> list[Path]:
    """Linearity measurements against the number of training examples per domain."""
    rows = df[df["kind"] == "trend"].copy()
    if rows.empty:
        return []
    keep = ["distance_relative", "linearity_rel_err_l2", "linearity_agreement", "ntk_kernel_distance"]
    rows = rows[rows["metric"].isin(keep) & (rows.get("role", "train").fillna("train") == "train")]
    rows["method"] = [f"{m} p={p:g}" for m, p in zip(rows["mode"], rows["p"])]
    if "form" in rows:  # the kernel distance's form (trace or full kernel: not comparable numbers)
        rows["metric"] = [f"{m} ({f} form)" if isinstance(f, str) else m for m, f in zip(rows["metric"], rows["form"])]
    g = sns.relplot(data=rows, x="n", y="value", hue="method", col="metric", col_wrap=2, kind="line", marker="o",
                    height=3, aspect=1.2, facet_kws={"sharey": False})
    g.set(xscale="log")
    return save(g.figure, rows, out_dir, name)


def make_all(df: pd.DataFrame, out_dir) -> list[Path]:
    """Every registered analysis's figure (a name of a function of this module, or a callable
    ``(df, out_dir) -> files``)."""
    from linft.analysis.registry import analyses
    paths: list[Path] = []
    for a in analyses():
        if a.figure is None:
            continue
        fig = globals()[a.figure] if isinstance(a.figure, str) else a.figure
        paths += list(fig(df, out_dir))
    return paths
