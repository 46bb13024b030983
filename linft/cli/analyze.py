"""`linft analyze KIND --run DIR [--run DIR2 ...] [options]`: run (or read back) an analysis of
finished runs and print its folder and its headline rows (all rows are in the folder's rows.jsonl).
Every registered analysis is a KIND; `linft analyze KIND --help` lists its options."""
from __future__ import annotations

import argparse
from pathlib import Path

_SHOW = ("env", "role", "split", "alpha", "t", "step", "model", "definition", "form", "at", "endpoint_b", "n", "mode")


def _runs_help(lo: int, hi: int | None) -> str:
    want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else f"{lo} or more"
    return f"a finished run folder; repeat for several ({want} runs)"


def _add_option(p: argparse.ArgumentParser, o) -> None:
    t = o.kind
    default = ",".join(map(str, o.default)) if t is tuple else o.default
    help_ = f"{o.help} (default: {default})"
    if t is bool:
        if o.default:
            p.add_argument("--no-" + o.flag[2:], dest=o.name, action="store_const", const=False, default=None, help=help_)
        else:
            p.add_argument(o.flag, dest=o.name, action="store_const", const=True, default=None, help=help_)
        return
    kw = dict(dest=o.name, default=None, help=help_)
    if t is tuple:
        kw["metavar"] = "A,B,..."
    else:
        kw["type"] = t
        if o.choices is not None:
            kw["choices"] = o.choices
    p.add_argument(o.flag, **kw)


def register(sub) -> None:
    from linft.analysis.registry import analyses
    p = sub.add_parser("analyze", help="analyses of finished runs: " + ", ".join(a.kind for a in analyses()),
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for a in analyses():
        k = kinds.add_parser(a.kind, help=a.help, description=a.help)
        k.add_argument("--run", action="append", required=True, metavar="DIR", help=_runs_help(*a.runs))
        for o in a.all_options:
            _add_option(k, o)
        k.set_defaults(func=_analyze)
    p.set_defaults(func=_analyze)


def _analyze(args) -> int:
    from linft.analysis.registry import analysis_dir, analyze, get
    a = get(args.kind)
    runs = [Path(r) for r in args.run]
    opts = {o.name: getattr(args, o.name) for o in a.all_options if getattr(args, o.name, None) is not None}
    import time
    t0 = time.perf_counter()
    # progress on stdout: stderr stays one line when the analysis stops on a user error
    print(f"analysis {a.kind} of {', '.join(r.name for r in runs)}: running (or reading back)...", flush=True)
    rows = analyze(a.kind, runs, **opts)
    print(f"analysis {a.kind}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    print(analysis_dir(a.kind, runs, opts))
    shown = [r for r in rows if a.is_headline(r) and (not a.summary or r["metric"] in a.summary)]
    for r in shown or rows:
        keys = [f"{k}={r[k]}" for k in _SHOW if k in r and not (k == "env" and r[k] == "pooled")]
        value = r["value"]
        print(f"{r['metric']:<22} {' '.join(keys)}  {value:.6g}" if isinstance(value, float)
              else f"{r['metric']:<22} {' '.join(keys)}  {value}")
    return 0
