"""`linft soup`, `linft collect`, `linft plot`, `linft report`: baselines across runs, tables and
figures from run folders."""
from __future__ import annotations

from pathlib import Path

from linft.errors import LinftError
from linft.results.model_selection import SelectionResults
from linft.results.report import FORMATS, load_study, make_figures, write_report
from linft.results.selection_frames import HPARAM_FIELDS, LEGACY_SELECTIONS, SELECTIONS


STUDY_HELP = ("the offline study: convergence of every run, verdicts of its claims (95%% t-intervals over "
              "seeds), cells, paired differences and figures")


def _source(args) -> dict:
    return {"root": args.root, "domainbed": args.domainbed}


def _hparams(args) -> tuple[str, ...]:
    return tuple(h.strip() for h in (args.hparams or "").split(",") if h.strip()) or HPARAM_FIELDS


def _collect(args) -> int:
    from linft.results.tables import format_domainbed_text
    if Path(args.out).suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise LinftError("--out *.parquet needs pyarrow: pip install 'linft[parquet]' (or write .csv)") from None
    study = load_study(**_source(args), hparams=_hparams(args))  # reads and checks everything first
    selection = LEGACY_SELECTIONS.get(args.selection, args.selection)
    res = study.tables.ood
    chosen = SelectionResults(res.cells[res.cells["selection"] == selection],
                              res.averages[res.averages["selection"] == selection], res.envs, res.n_records)
    if chosen.cells.empty:
        raise LinftError(f"selection {selection!r} has no table here (leave-one-domain-out needs runs "
                         f"holding out two domains)")
    df = study.tables.frame if study.rows is None else study.rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out)
    else:
        df.to_csv(out, index=False)
    print(format_domainbed_text(chosen), end="")
    what = f"{df['run'].nunique()} runs" if study.rows is not None else f"{study.tables.frame['run'].nunique()} DomainBed runs"
    print(f"{len(df)} rows from {what} -> {out}")
    return 0


def _plot(args) -> int:
    for p in make_figures(args.root, args.out, domainbed=args.domainbed):
        print(p)
    return 0


def _report(args) -> int:
    print(write_report(args.root, args.out, domainbed=args.domainbed, fmt=args.format, hparams=_hparams(args)))
    return 0


def _add_source(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--root", help="a linft runs root (one folder per run)")
    g.add_argument("--domainbed", metavar="DIR", help="a DomainBed sweep output folder (<DIR>/<run>/results.jsonl)")


def _add_hparams(p) -> None:
    p.add_argument("--hparams", default="", metavar="F1,F2",
                   help="config fields selected over (default: " + ",".join(HPARAM_FIELDS) + "); every other "
                        "field that differs between runs, except seed and trial_seed, makes a separate method")


def _soup(args) -> int:
    from linft.analysis.registry import analysis_dir, analyze
    rows = analyze("soup", args.run)
    print(analysis_dir("soup", args.run))
    for r in rows:
        if r["metric"] == "acc" and r["split"] == ("in" if r["role"] == "test" else "out"):
            print(f"{r['model']:<16} members {r['members']}  {r['role']:<5} {r['env']:<12} acc {r['value']:.4f}")
    return 0


def _study(args) -> int:
    from linft.results.study_claims import write_study
    if args.fixed_steps < 1 or args.epochs <= 0:
        raise LinftError("--fixed-steps must be >= 1 and --epochs > 0")
    for p in write_study(args.root, args.out, args.fixed_steps, args.epochs, curves_n=args.curves_n,
                         n_all=args.n_all, chance=args.chance, fidelity_role=args.fidelity_role):
        print(p)
    return 0


def register(sub) -> None:
    p = sub.add_parser("soup", help="uniform soup, greedy soup and output ensemble of finished runs")
    p.add_argument("--root", default=None, help="accepted and unused: a soup is stored under its first member "
                   "run (<run>/analyses/soup-<id>/)")
    p.add_argument("run", nargs="+", help="run folders (same architecture, data and split)")
    p.set_defaults(func=_soup)
    p = sub.add_parser("collect", help="all rows of a runs folder as one long table (CSV or Parquet), "
                                       "and the o.o.d. table of one selection method")
    _add_source(p)
    p.add_argument("--out", default="results.csv")
    p.add_argument("--selection", default="training_domain_validation",
                   choices=(*SELECTIONS, *LEGACY_SELECTIONS))
    _add_hparams(p)
    p.set_defaults(func=_collect)
    p = sub.add_parser("plot", help="every figure the runs support (PNG, PDF and the CSV behind each)")
    _add_source(p)
    p.add_argument("--out", default="figures")
    p.set_defaults(func=_plot)
    p = sub.add_parser("report", help="a report: summary and DomainBed-style tables (and figures for markdown)")
    _add_source(p)
    p.add_argument("--out", default=None, help="default: report.md / report.tex / report.csv")
    p.add_argument("--format", default="markdown", choices=tuple(FORMATS))
    _add_hparams(p)
    p.set_defaults(func=_report)
    p = sub.add_parser("study", help=STUDY_HELP)
    p.add_argument("root", help="the study's runs root (one folder per run, analyses under each)")
    p.add_argument("--out", default="study", help="output folder (claims.md, cells.csv, paired.csv, "
                   "convergence.csv, figures/)")
    p.add_argument("--fixed-steps", type=int, required=True, metavar="S",
                   help="the fixed-steps protocol: runs of S steps at every n")
    p.add_argument("--epochs", type=float, required=True, metavar="E",
                   help="the fixed-epochs protocol: runs of round(E * n / batch_size) steps")
    p.add_argument("--curves-n", type=int, default=1000, metavar="N",
                   help="training-curve figures at this n (and at the largest n)")
    p.add_argument("--n-all", type=int, default=None, metavar="N",
                   help="the n of runs with n_per_domain=0 (all of the 'in' split)")
    p.add_argument("--chance", type=float, default=10.0,
                   help="chance accuracy in percent (the convergence rule asks iid > chance + 10; default 10: "
                        "Digits' 10 classes)")
    p.add_argument("--fidelity-role", default="train", choices=("train", "test"),
                   help="the pooled Taylor-fidelity rows claims (e) and (f) read: train = the training domains' "
                        "held-out split (where the NTK probe is drawn), test = the test domains")
    p.set_defaults(func=_study)
