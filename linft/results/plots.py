"""Figures: one function per figure, each a function of a tidy DataFrame. Every figure is saved as
PNG and PDF next to the CSV of exactly the data it shows, and carries a caption naming the data,
backbone, steps and seeds behind it and what its error bars are.

Conventions, the same in every figure: one colour-blind-safe palette keyed by method name in
method-family order, colour = method without p, marker = p (:func:`method_palette`); legends outside the axes;
accuracies in percent, as in the tables; an error bar is the standard error over the n trials
(seeds) of one method and setting -- runs that differ in anything but the seed are never pooled.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# seaborn's "colorblind" palette (10 colours, after Okabe & Ito), fixed here so that no style
# setting can change it.
COLORBLIND = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494",
              "#ece133", "#56b4e9")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SE_TEXT = "error bars: standard error over n trials (seeds), np.std ddof=0 / sqrt(n)"


def _base(method: str) -> str:
    return re.sub(r" p=[0-9.]+", "", method)


def _p(method: str) -> float:
    m = re.search(r" p=([0-9.]+)", method)
    return float(m.group(1)) if m else 0.0


def method_palette(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    """method -> (colour, marker), fixed for a report and keyed by name: the colour is the
    method without its dropout rate (mode, model, other fields) in family order (full, tail,
    linear, ...), the marker the dropout rate p (circle for the smallest)."""
    from linft.results.selection_frames import family_key
    ordered = sorted(dict.fromkeys(methods), key=family_key)
    bases = list(dict.fromkeys(_base(m) for m in ordered))
    ps = sorted({_p(m) for m in ordered})
    return {m: (COLORBLIND[bases.index(_base(m)) % len(COLORBLIND)], MARKERS[ps.index(_p(m)) % len(MARKERS)])
            for m in ordered}


def provenance(df: pd.DataFrame) -> str:
    """'data: ...; test domain: ...; backbone: ...; steps: ...; seeds: ...' from the config
    columns present in ``df``."""
    def vals(col):
        if col not in df:
            return None
        v = df[col].dropna()
        v = v.map(lambda x: ",".join(map(str, x)) if isinstance(x, (tuple, list)) else x)
        return ", ".join(map(str, sorted(v.unique(), key=str)))
    parts = []
    for col, label in (("dataset", "data"), ("test_envs", "test domains"), ("test_env", "test domain"),
                       ("backbone", "backbone"), ("steps", "steps"), ("seed", "seeds")):
        v = vals(col)
        if v is not None:
            parts.append(f"{label}: {v}")
    return "; ".join(parts)


def save(fig: plt.Figure, data: pd.DataFrame, out_dir: str | Path, name: str, caption: str | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = caption if caption is not None else provenance(data)
    fig.tight_layout()
    # below the figure's bottom edge (the axis labels stay clear); bbox_inches="tight" takes it in
    import textwrap
    wrapped = "\n".join(textwrap.fill(part, 100) for part in text.split("\n"))
    fig.text(0.01, -0.01, wrapped, fontsize=6.5, color="0.3", ha="left", va="top")
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    data.to_csv(paths[2], index=False)
    plt.close(fig)
    return paths


def _legend_outside(ax, title: str = "method") -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, title=title, fontsize=7, title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False)


def _caption(prov: str, n: pd.Series, what: str) -> str:
    ns = sorted({int(x) for x in n})
    nt = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
    return f"{what}; {SE_TEXT.replace('n trials', f'{nt} trials')}.\n{prov}"


def iid_vs_ood(points: pd.DataFrame, out_dir, palette: Mapping[str, tuple[str, str]], prov: str,
               name: str = "iid_vs_ood") -> list[Path]:
    """[ZB] Fig. 2 style: one point per (method, hyperparameter setting, dataset), i.i.d. vs
    o.o.d. accuracy of the step chosen by training-domain validation, averaged over seeds
    (columns of :func:`linft.results.selection_frames.seed_mean`)."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for m in [m for m in palette if m in set(points["method"])]:
        g = points[points["method"] == m]
        colour, marker = palette[m]
        ax.errorbar(g["iid_acc"], g["ood_acc"], xerr=g["iid_acc_se"], yerr=g["ood_acc_se"], fmt=marker,
                    color=colour, ms=5, capsize=2, lw=0.8, label=m)
    ax.set_xlabel("i.i.d. accuracy (%) — training domains, held-out split")
    ax.set_ylabel("o.o.d. accuracy (%) — test domain")
    _legend_outside(ax)
    cap = _caption(prov, points["n"], "one point per method and hyperparameter setting (no selection "
                   "across settings), step by training-domain validation, mean over test domains")
    return save(fig, points, out_dir, name, cap)


def _bars(ax, part: pd.DataFrame, palette, order) -> None:
    for i, m in enumerate(order):
        r = part[part["method"] == m]
        if r.empty or r["n"].iloc[0] == 0:
            continue
        colour, marker = palette[m]
        ax.errorbar([i], r["mean"], yerr=r["se"].fillna(0), fmt=marker, color=colour, ms=6, capsize=3, label=m)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=35, ha="right", fontsize=7)


def accuracy_by_mode(avgs: pd.DataFrame, out_dir, palette, prov: str, name: str = "linear_vs_nonlinear") -> list[Path]:
    """Per method (family order): i.i.d. and o.o.d. accuracy under training-domain validation
    (hyperparameters and step selected per trial), one panel per dataset and accuracy kind.
    ``avgs``: the averages rows (columns accuracy, method, dataset, mean, se, n)."""
    avgs = avgs[avgs["dataset"] != "Avg"]
    datasets = list(dict.fromkeys(avgs["dataset"]))
    order = [m for m in palette if m in set(avgs["method"])]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(7.5, 3.4 * len(datasets)), squeeze=False)
    for row, d in enumerate(datasets):
        for col, what in enumerate(("i.i.d.", "o.o.d.")):
            ax = axes[row][col]
            _bars(ax, avgs[(avgs["dataset"] == d) & (avgs["accuracy"] == what)], palette, order)
            ax.set_title(f"{d}: {what}", fontsize=9)
            ax.set_ylabel(f"{what} accuracy (%)")
    cap = _caption(prov, avgs["n"], "selection: training-domain validation (hyperparameters and step "
                   "chosen per trial), mean over the test domains of each trial")
    return save(fig, avgs, out_dir, name, cap)


def ood_vs_dropout(avgs: pd.DataFrame, out_dir, palette, prov: str, name: str = "ood_vs_dropout") -> list[Path]:
    """o.o.d. accuracy (training-domain validation) against the dropout rate p; one line per
    method without its p (columns method, base, p, dataset, mean, se, n)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    order = {m: i for i, m in enumerate(palette)}
    avgs = avgs.sort_values("method", key=lambda s: s.map(order), kind="stable")
    for (base, d), g in avgs.groupby(["base", "dataset"], sort=False):
        g = g.sort_values("p")
        colour = palette[g["method"].iloc[0]][0]
        ax.errorbar(g["p"], g["mean"], yerr=g["se"].fillna(0), fmt="-", color=colour, capsize=3,
                    label=base if avgs["dataset"].nunique() == 1 else f"{base} ({d})")
        for m, p, y in zip(g["method"], g["p"], g["mean"]):
            ax.plot([p], [y], palette[m][1], color=colour, ms=6)
    ax.set_xlabel("dropout rate p on the pooled representation")
    ax.set_ylabel("o.o.d. accuracy (%) — test domain")
    _legend_outside(ax)
    cap = _caption(prov, avgs["n"], "selection: training-domain validation, mean over test domains")
    return save(fig, avgs, out_dir, name, cap)


def clouds(points: pd.DataFrame, out_dir, palette, prov: str, name: str = "hparam_clouds") -> list[Path]:
    """[ZB] clouds: one point per way of choosing a hyperparameter setting per test domain (each
    setting first averaged over seeds); accuracies in percent."""
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for m in [m for m in palette if m in set(points["method"])]:
        g = points[points["method"] == m]
        colour, marker = palette[m]
        ax.scatter(100 * g["iid_acc"], 100 * g["ood_acc"], s=6, alpha=0.35, linewidths=0, color=colour,
                   marker=marker, label=m)
    ax.set_xlabel("i.i.d. accuracy (%), mean over test domains")
    ax.set_ylabel("o.o.d. accuracy (%), mean over test domains")
    _legend_outside(ax)
    for h in ax.get_legend().legend_handles if ax.get_legend() else []:
        h.set_alpha(1)
    cap = ("one point per choice of one hyperparameter setting per test domain, each setting "
           f"averaged over its seeds; no error bars (points are not independent).\n{prov}")
    return save(fig, points, out_dir, name, cap)
