"""`linft soup`, `linft collect`, `linft plot`, `linft report`: baselines across runs, tables and
figures from run folders."""
from __future__ import annotations

from pathlib import Path

from linft.errors import LinftError


def _collect(args) -> int:
    from linft.results import collect
    from linft.results.report import _frame
    out = Path(args.out)
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise LinftError("--out *.parquet needs pyarrow: pip install 'linft[parquet]' (or write .csv)") from None
    df = _frame(args.root)
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
    from linft.results.report import make_figures
    for p in make_figures(args.root, args.out):
        print(p)
    return 0


def _report(args) -> int:
    from linft.results.report import write_report
    print(write_report(args.root, args.out))
    return 0


def _soup(args) -> int:
    from linft.analysis.soups import soups
    rows = soups(args.run, args.root)
    for r in rows:
        if r["metric"] == "acc" and r["split"] == ("in" if r["role"] == "test" else "out"):
            print(f"{r['model']:<16} members {r['members']}  {r['role']:<5} {r['env']:<12} acc {r['value']:.4f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("soup", help="uniform soup, greedy soup and output ensemble of finished runs")
    p.add_argument("--root", required=True, help="where _soups/<id>/ is written")
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
