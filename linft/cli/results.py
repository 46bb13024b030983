"""`linft soup`, `linft collect`, `linft plot`, `linft report`: baselines across runs, tables and
figures from run folders."""
from __future__ import annotations

from pathlib import Path

from linft.results import collect
from linft.results.report import _frame, make_figures, write_report


def _collect(args) -> int:
    df = _frame(args.root)
    out = Path(args.out)
    if out.suffix == ".parquet":
        df.to_parquet(out)
    else:
        df.to_csv(out, index=False)
    acc = collect.selected_accuracy(df, args.selection)
    if not acc.empty:
        print(collect.to_markdown(collect.domainbed_table(acc, "ood_acc")))
    print(f"{len(df)} rows from {df['run'].nunique()} runs -> {out}")
    return 0


def _plot(args) -> int:
    for p in make_figures(args.root, args.out):
        print(p)
    return 0


def _report(args) -> int:
    print(write_report(args.root, args.out))
    return 0


def _soup(args) -> int:
    from linft.analysis.registry import analysis_dir, analyze
    rows = analyze("soup", args.run)
    print(analysis_dir("soup", args.run))
    for r in rows:
        if r["metric"] == "acc" and r["split"] == ("in" if r["role"] == "test" else "out"):
            print(f"{r['model']:<16} members {r['members']}  {r['role']:<5} {r['env']:<12} acc {r['value']:.4f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("soup", help="uniform soup, greedy soup and output ensemble of finished runs")
    p.add_argument("--root", default=None, help="accepted and unused: a soup is stored under its first member "
                   "run (<run>/analyses/soup-<id>/)")
    p.add_argument("run", nargs="+", help="run folders (same architecture, data and split)")
    p.set_defaults(func=_soup)
    p = sub.add_parser("collect", help="all rows of a runs folder as one long table (CSV or Parquet)")
    p.add_argument("--root", required=True)
    p.add_argument("--out", default="results.csv")
    p.add_argument("--selection", default="train_val", choices=("train_val", "oracle"))
    p.set_defaults(func=_collect)
    p = sub.add_parser("plot", help="every figure the runs support (PNG, PDF and the CSV behind each)")
    p.add_argument("--root", required=True)
    p.add_argument("--out", default="figures")
    p.set_defaults(func=_plot)
    p = sub.add_parser("report", help="a markdown report with tables and figures")
    p.add_argument("--root", required=True)
    p.add_argument("--out", default="report.md")
    p.set_defaults(func=_report)
