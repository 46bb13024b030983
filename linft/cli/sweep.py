"""`linft sweep {status,launch,delete-incomplete} EXPERIMENT --root DIR`."""
from __future__ import annotations


def _experiment(args):
    from linft.sweeps.grid import load_experiment
    overrides = {k: v for k, v in (("data_root", args.data_root), ("cache_dir", args.cache_dir),
                                   ("weights_file", args.weights_file), ("tensorboard", args.tensorboard),
                                   ("keep_checkpoint", args.keep_checkpoint or None)) if v}
    return load_experiment(args.experiment, args.variant, **overrides)


def _status(args) -> int:
    from linft.sweeps.grid import status
    exp = _experiment(args)
    st = status(exp, args.root)
    print(f"{exp.name} [{args.variant}]: {len(exp.configs)} runs  " +
          "  ".join(f"{k} {len(v)}" for k, v in st.items()))
    for state in ("failed", "running"):
        for cfg in st[state]:
            reason = (args.root and __import__("pathlib").Path(args.root, cfg.run_id, "failed"))
            extra = reason.read_text().strip() if state == "failed" and reason.exists() else ""
            print(f"  {state:<8} {cfg.run_id}  {extra}")
    return 0


def _launch(args) -> int:
    exp = _experiment(args)
    if getattr(args, "launcher", "local") != "local":  # [slurm] submitit job array
        from linft.sweeps.slurm import launch_cli
        return launch_cli(exp, args)
    from linft.sweeps.grid import launch
    counts = launch(exp, args.root, jobs=args.jobs, vectorize=args.vectorize)
    print(f"{exp.name} [{args.variant}]: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    return 0 if counts["failed"] == 0 and counts["missing"] == 0 and counts["running"] == 0 else 1


def _delete(args) -> int:
    from linft.sweeps.grid import delete_incomplete
    removed = delete_incomplete(_experiment(args), args.root)
    print(f"removed {len(removed)} incomplete run(s)" + "".join(f"\n  {r}" for r in removed))
    return 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="named experiments: status, launch (skips done runs), delete-incomplete")
    verbs = p.add_subparsers(dest="verb", required=True)
    for name, func in (("status", _status), ("launch", _launch), ("delete-incomplete", _delete)):
        v = verbs.add_parser(name)
        v.add_argument("experiment", help="a name from experiments/ (e.g. linear_vs_nonlinear) or a TOML path")
        v.add_argument("--root", required=True, help="runs folder")
        v.add_argument("--variant", default="paper", help="'paper' (default) or a variant, e.g. 'offline'")
        v.add_argument("--data-root", default=None)
        v.add_argument("--cache-dir", default=None)
        v.add_argument("--weights-file", default=None,
                       help="your own backbone weights for every run (the run ids hash the file's sha256)")
        if name == "launch":
            v.add_argument("--tensorboard", default=None, metavar="DIR",
                           help="mirror every run's rows to TensorBoard under DIR/<run id>")
            v.add_argument("--keep-checkpoint", action="store_true",
                           help="keep checkpoint.pt of finished runs (default: only final.pt stays)")
        else:
            v.set_defaults(tensorboard=None, keep_checkpoint=False)
        if name == "launch":
            v.add_argument("--jobs", type=int, default=1, help="processes at a time (one per GPU on GPU machines)")
            v.add_argument("--vectorize", type=int, default=1, metavar="K",
                           help="train runs differing only in seed/p/lr/weight decay K at a time in one pass")
            from linft.sweeps.slurm import add_launcher_flags  # [slurm]
            add_launcher_flags(v)
        v.set_defaults(func=func)
