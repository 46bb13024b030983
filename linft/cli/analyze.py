"""`linft analyze KIND --run DIR [--run DIR2] [options]`: run (or read back) an analysis of finished
runs and print its folder and its pooled summary rows (all rows are in the folder's rows.jsonl)."""
from __future__ import annotations

import argparse
from pathlib import Path

from linft.errors import LinftError

CLI_KINDS = ("distance", "interp", "funcinterp", "identity", "linearity", "ntk", "trend")


def register(sub) -> None:
    p = sub.add_parser("analyze", help="weight distance, interpolation, Taylor fidelity, NTK of finished runs",
                       description=__doc__)
    p.add_argument("kind", choices=CLI_KINDS)
    p.add_argument("--run", action="append", required=True, metavar="DIR",
                   help="a finished run folder; give two for run-vs-run analyses (trend: two or more)")
    p.add_argument("--weights", default="trainable", choices=("trainable", "traj_avg"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--grid", type=int, default=None, help="uniform grid points incl. both endpoints "
                   "(interp/funcinterp 11, identity 21)")
    p.add_argument("--min-spacing", type=float, default=None, help="interp: refine around the maximum to this spacing (1/80)")
    p.add_argument("--no-refine", action="store_true", help="interp: uniform grid only")
    p.add_argument("--bn-policy", default="frozen", choices=("frozen",))
    p.add_argument("--ts", default=None, help="linearity: comma-separated path fractions (0.25,0.5,1)")
    p.add_argument("--engine", default=None, choices=("jvp", "onepass"), help="linearity: Taylor engine (jvp)")
    p.add_argument("--probe-size", type=int, default=None, help="ntk: probe examples (64)")
    p.add_argument("--probe-seed", type=int, default=None)
    p.add_argument("--form", default=None, choices=("trace", "full"), help="ntk: [N,N] trace or [N,C,N,C] full")
    p.add_argument("--method", default=None, choices=("auto", "jacobian", "ntvp"))
    p.add_argument("--kinds", default="distance,linearity,ntk", help="trend: analyses to summarise")
    p.set_defaults(func=_analyze)


def _options(args: argparse.Namespace) -> dict:
    kind = args.kind
    opts = {"weights": args.weights, "dtype": args.dtype, "device": args.device}
    if kind in ("interp", "funcinterp", "identity"):
        opts["bn_policy"] = args.bn_policy
        if args.grid is not None:
            opts["grid"] = args.grid
    if kind == "interp":
        if args.min_spacing is not None:
            opts["min_spacing"] = args.min_spacing
        if args.no_refine:
            opts["refine"] = False
    if kind == "linearity":
        if args.ts:
            try:
                opts["ts"] = [float(t) for t in args.ts.split(",") if t.strip()]
            except ValueError as e:
                raise LinftError(f"--ts must be comma-separated numbers, got {args.ts!r}") from e
        if args.engine:
            opts["engine"] = args.engine
    if kind == "ntk":
        for name in ("probe_size", "probe_seed", "form", "method"):
            if getattr(args, name) is not None:
                opts[name] = getattr(args, name)
    return opts


def _analyze(args) -> int:
    runs = [Path(r) for r in args.run]
    if args.kind == "trend":
        from linft.analysis.fidelity import size_trend
        if len(runs) < 2:
            raise LinftError("trend needs two or more runs (--run DIR --run DIR ...)")
        # progress on stdout: stderr stays one line when the analysis stops on a user error
        print(f"analysis trend of {len(runs)} runs: running (or reading back) each run's analyses...", flush=True)
        rows = size_trend(runs, kinds=tuple(k for k in args.kinds.split(",") if k),
                          weights=args.weights, dtype=args.dtype, device=args.device)
        for r in rows:
            print(f"n={r['n']:>6} {r['mode']:>7} p={r['p']:<4} {r['metric']:<26} {r.get('role', ''):>5} "
                  f"{r.get('split', ''):>3} {r['value']:.6g}")
        return 0
    import time
    from linft.analysis.loading import analysis_dir, analyze
    opts = _options(args)
    t0 = time.perf_counter()
    # progress on stdout: stderr stays one line when the analysis stops on a user error
    print(f"analysis {args.kind} of {', '.join(r.name for r in runs)}: running (or reading back)...", flush=True)
    rows = analyze(args.kind, runs, **opts)
    print(f"analysis {args.kind}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    print(analysis_dir(args.kind, runs, opts))
    for r in rows:
        if not (r.get("env") == "pooled" or r.get("level") == "total"):
            continue
        if args.kind in ("interp", "funcinterp") and "alpha" in r and r["alpha"] not in (0.0, 0.5, 1.0):
            continue
        keys = [f"{k}={r[k]}" for k in ("role", "split", "alpha", "t", "model", "definition", "at", "endpoint_b")
                if k in r]
        value = r["value"]
        print(f"{r['metric']:<22} {' '.join(keys)}  {value:.6g}" if isinstance(value, float)
              else f"{r['metric']:<22} {' '.join(keys)}  {value}")
    return 0
