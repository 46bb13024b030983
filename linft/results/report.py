"""Tables and figures from run folders: every figure the runs support, and the markdown report."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from linft.results import collect
from linft.results import plots
from linft.errors import LinftError


def _frame(root) -> pd.DataFrame:
    df = collect.load_rows(root)
    if df.empty:
        raise LinftError(f"no run rows under {str(root)!r}")
    return df


def make_figures(root, out_dir) -> list[Path]:
    df = _frame(root)
    acc = collect.selected_accuracy(df, "train_val")
    paths: list[Path] = []
    if not acc.empty:
        paths += plots.iid_vs_ood(acc, out_dir)
        paths += plots.accuracy_by_mode(acc[acc["model"] == "current"], out_dir)
        if acc["p"].nunique() > 1:
            paths += plots.ood_vs_dropout(acc, out_dir)
        cloud = collect.hparam_clouds(acc[acc["model"] == "current"])
        if len(cloud) > cloud["method"].nunique():  # more than one point per method
            prov = acc.drop_duplicates("dataset")[["dataset", "backbone", "seed"]]
            paths += plots.clouds(cloud.merge(prov, on="dataset"), out_dir)
    from linft.results import plots_analysis
    paths += plots_analysis.make_all(df, out_dir)
    return paths


def write_report(root, out: str | Path, figures_dir: str | Path | None = None, title: str = "linft report") -> Path:
    df = _frame(root)
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir else out.parent / "figures"
    figs = make_figures(root, figures_dir)
    lines = [f"# {title}", "", f"Runs: {df['run'].nunique()} under `{root}` ({plots.provenance(df)}).", ""]
    states = df.groupby("run")["state"].first().value_counts().to_dict()
    lines += ["Run states: " + ", ".join(f"{k} {v}" for k, v in states.items()), ""]
    for selection, label in (("train_val", "training-domain validation"), ("oracle", "test-domain oracle")):
        acc = collect.selected_accuracy(df, selection)
        if acc.empty:
            continue
        for column, what in (("ood_acc", "o.o.d. accuracy (test domain, %)"), ("iid_acc", "i.i.d. accuracy (training domains' held-out split, %)")):
            lines += [f"## {what}, selection: {label}", "",
                      "mean ± standard error over seeds; traj. ens = the trajectory ensemble, which averages the "
                      "logits of the trajectory's models ([ZB] sums them: the same accuracy, a different loss)", "",
                      collect.to_markdown(collect.domainbed_table(acc, column)), ""]
    summary = collect.analysis_summary(df)
    if not summary.empty:
        lines += ["## Linearity measurements (linft analyze; pooled over domains)", "",
                  " ".join(collect.analysis_notes(summary["kind"].unique())), "",
                  collect.to_markdown(summary.astype(object).fillna("")), ""]
    steps = df[(df["kind"] == "train") & (df["metric"] == "img_per_s")].groupby("mode")["value"].median()
    if not steps.empty:
        lines += ["## Throughput on this machine (median images/s per mode)", ""]
        lines += [f"- {mode}: {v:.0f} img/s" for mode, v in steps.items()] + [""]
    lines += ["## Figures", ""]
    for p in figs:
        if p.suffix == ".png":
            rel = Path(*p.parts[len(out.parent.parts):]) if out.parent in p.parents else p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
