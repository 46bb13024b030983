"""Figures: one function per figure, each a function of a tidy DataFrame. Every figure is saved as
PNG and PDF next to the CSV of exactly the data it shows, and carries a caption line naming the
data, backbone and seeds behind it."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def provenance(df: pd.DataFrame) -> str:
    """'data: ...; backbone: ...; seeds: ...' from the config columns present in ``df``."""
    def vals(col):
        return ", ".join(map(str, sorted(df[col].dropna().unique()))) if col in df else "?"
    parts = [f"data: {vals('dataset')}", f"backbone: {vals('backbone')}", f"seeds: {vals('seed')}"]
    if "test_env" in df:
        parts.insert(1, f"test domain: {vals('test_env')}")
    return "; ".join(parts)


def save(fig: plt.Figure, data: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.text(0.01, 0.005, provenance(data), fontsize=7, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    data.to_csv(paths[2], index=False)
    plt.close(fig)
    return paths


def iid_vs_ood(acc: pd.DataFrame, out_dir, name: str = "iid_vs_ood") -> list[Path]:
    """[ZB] Fig. 2 style: one point per run (and model), i.i.d. vs o.o.d. accuracy per method."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    sns.scatterplot(data=acc, x="iid_acc", y="ood_acc", hue="method", style="method", s=45, ax=ax)
    ax.set_xlabel("i.i.d. accuracy (training domains, held-out split)")
    ax.set_ylabel("o.o.d. accuracy (test domain)")
    ax.legend(fontsize=7, loc="best")
    return save(fig, acc, out_dir, name)


def accuracy_by_mode(acc: pd.DataFrame, out_dir, name: str = "linear_vs_nonlinear") -> list[Path]:
    """Accuracy of each mode (full, tail, linear, ...) at each dropout rate, i.i.d. and o.o.d.,
    mean and 95% interval over seeds."""
    long = acc.melt(id_vars=[c for c in acc.columns if c not in ("iid_acc", "ood_acc")],
                    value_vars=["iid_acc", "ood_acc"], var_name="split_kind", value_name="accuracy")
    long["split_kind"] = long["split_kind"].map({"iid_acc": "i.i.d.", "ood_acc": "o.o.d."})
    long["dropout"] = "p=" + long["p"].map("{:g}".format)
    g = sns.catplot(data=long, x="mode", y="accuracy", hue="dropout", col="split_kind", kind="point",
                    dodge=0.3 if long["dropout"].nunique() > 1 else False, errorbar=("ci", 95), height=3.6, aspect=1.1, sharey=False,
                    order=[m for m in ("full", "tail", "linear", "unfolded", "probe", "scratch") if m in set(long["mode"])])
    g.set_titles("{col_name}")
    return save(g.figure, long, out_dir, name)


def ood_vs_dropout(acc: pd.DataFrame, out_dir, name: str = "ood_vs_dropout") -> list[Path]:
    """o.o.d. accuracy against the dropout rate, one line per mode (and model)."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    sns.lineplot(data=acc, x="p", y="ood_acc", hue="mode", style="model", marker="o", errorbar=("ci", 95), ax=ax)
    ax.set_xlabel("dropout rate p on the pooled representation")
    ax.set_ylabel("o.o.d. accuracy")
    return save(fig, acc, out_dir, name)


def clouds(points: pd.DataFrame, out_dir, name: str = "hparam_clouds") -> list[Path]:
    """[ZB] clouds: one point per way of choosing a hyperparameter setting per test domain."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    sns.scatterplot(data=points, x="iid_acc", y="ood_acc", hue="method", s=6, alpha=0.35, linewidth=0, ax=ax)
    ax.set_xlabel("i.i.d. accuracy (mean over test domains)")
    ax.set_ylabel("o.o.d. accuracy (mean over test domains)")
    ax.legend(fontsize=7, markerscale=3)
    return save(fig, points, out_dir, name)
