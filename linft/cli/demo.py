"""`linft demo` (what `make demo` runs): the offline study's 5-minute slice, offline, on the embedded
default -- real ImageNet EfficientNet-Lite0 weights, MNIST (training domain) -> UCI optdigits (test
domain), 48 px, the study's settings (``experiments/offline_study.toml``, variant ``demo``):

1. the standard and the linearized tail at p = 0 and p = 0.9 from one LP-FT start (n = 1,000, one
   seed, 1,500 steps: converged, as convergence.csv shows), two runs at a time;
2. the linearity analyses: post-hoc Taylor fidelity, weight distance and the full [N, C, N, C]
   kernel distance at every snapshot (the trajectory), the barrier theta0 -> theta_ft, the trained
   linear-vs-standard pairs and the linear-model identities;
3. the study's tables and figures (claims.md: with one seed every claim reads inconclusive, by
   its rule) and the report, in ``--out``.

What the slice leaves out (seeds, sizes, rates, controls) is the full study:
``bash experiments/offline_study.sh`` (paper_notes.md section 11).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

FIXED_STEPS, EPOCHS = 1500, 4.8  # the study's protocol (experiments/offline_study.toml)
TRAJECTORY = {"form": "full", "probe_size": 16, "max_examples": 1000}  # as the study's analyses


def demo_configs(cache_dir: str) -> dict:
    """The slice's runs by name ("tail p=0", ...): the study's ``demo`` variant."""
    from linft.sweeps.grid import load_experiment
    exp = load_experiment("offline_study", "demo", cache_dir=cache_dir)
    return {f"{c.mode} p={c.p:g}": c for c in exp.configs}


def _analyses(paths: dict) -> list[tuple[str, list, dict]]:
    """Fidelity / weight / kernel distance at every snapshot of both tails (the study's
    ``trajectory`` options), the barrier theta0 -> theta_ft at p = 0.9, the trained pairs, the
    identities of the two linearized runs and the weight distances of the two tails."""
    t0, t9, l0, l9 = (str(paths[k]) for k in ("tail p=0", "tail p=0.9", "linear p=0", "linear p=0.9"))
    return [("trajectory", [t0], TRAJECTORY), ("trajectory", [t9], TRAJECTORY), ("interp", [t9], {"refine": False}),
            ("linearity", [l0, t0], {}), ("linearity", [l9, t9], {}), ("identity", [l0, l9], {"grid": 5}),
            ("distance", [t0, t9], {})]


def run_demo(out: str | Path = "linft-demo", figures: str | Path | None = None, jobs: int = 2) -> Path:
    from linft.analysis.registry import analyze
    from linft.results.report import write_report
    from linft.results.study_claims import write_study
    from linft.sweeps.grid import Experiment, launch
    t0 = time.perf_counter()
    out = Path(out)
    root, figures = out / "runs", Path(figures or out / "figures")
    configs = demo_configs(str(out / "cache"))

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    # the runs' processes share the cores (inherited); this process's analyses then use them all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(jobs, 1))))
    stage(f"{len(configs)} runs, {jobs} at a time: {', '.join(configs)} (n=1000, 1500 steps, 48 px)")
    counts = launch(Experiment("offline_study:demo", "", "", list(configs.values())), root, jobs=jobs)
    if counts.get("failed"):
        stage(f"{counts['failed']} run(s) failed: see {root}/.sweep/*.log")
    paths = {name: root / c.run_id for name, c in configs.items()}
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    for kind, runs, options in _analyses(paths):
        stage(f"analysis {kind}: {' vs '.join(Path(r).name for r in runs)}")
        analyze(kind, runs, **options)
    stage("study tables and figures, report")
    write_study(root, figures, fixed_steps=FIXED_STEPS, epochs=EPOCHS)
    report = write_report(root, out / "report.md", figures,
                          title="linft demo: EfficientNet-Lite0 (ImageNet), MNIST -> UCI optdigits, 48 px")
    stage(f"done: {report} and {figures}/claims.md")
    return report


def _main(args) -> int:
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(Path(args.out))
    run_demo(args.out, args.figures, args.jobs)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the offline study's 5-minute slice on the embedded default "
                                    "(EfficientNet-Lite0, MNIST -> optdigits)")
    p.add_argument("--out", default="linft-demo", help="output folder (runs, cache, report.md, figures/)")
    p.add_argument("--figures", default=None, help="where tables and figures go (default: OUT/figures)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (default 2: this machine's cores)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (otherwise finished work is reused)")
    p.set_defaults(func=_main)
