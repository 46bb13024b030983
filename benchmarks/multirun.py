"""K runs trained as one vectorised group (linft.training.group) vs the same K runs trained one after
the other by the real trainer (what `linft train` runs), at the offline study's shapes
(linft.cli.demo.demo_configs: EfficientNet-Lite0 ``efficientnet_lite0.in1k``, k=3, Digits at 32 px,
feature_cache=true, augment=false, batch 32).

Members: K = 8 runs of one grid point differing in p (0, 0.5, 0.8, 0.9) and lr (1e-3, 3e-3) with one
seed ("shared": they share every batch, and a linearized tail's primal stream), or in seed as well
("seeds": every member its own data order). Each round trains the K runs sequentially and as one
group into fresh folders (setup, evaluations, checkpoints and rows included; the feature cache is
built once before); rounds are interleaved and the ratio is the median over rounds of
(sequential time / group time) = the throughput ratio. ``--memory`` reports the peak resident
memory of a group of K = 1, 4, 8, 16 (one fresh process each) and the group trainer's estimate.

Measured (2 shared CPU cores under other load, 2 threads, --quick, tail, "shared"): sequential
518/631/728 s vs group 192/245/293 s per round, ratios 2.70/2.57/2.48, median 2.57x; peak RSS of a
group of K = 1/4/8/16: 1077/1269/1575/2142 MiB (estimate 72 MiB per member). The "seeds" scenario and
the linear rows were not measured (time).

Usage: python benchmarks/multirun.py [--quick] [--k 8] [--rounds 3] [--modes tail,linear]
       [--scenarios shared,seeds] [--threads 2] [--memory]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import CPU  # noqa: E402  (puts the checkout on sys.path)
from linft.cli.demo import demo_configs  # noqa: E402
from linft.training.group import train_group  # noqa: E402
from linft.training.launch import train  # noqa: E402


def members(base, k: int, scenario: str):
    grid = [(p, lr) for lr in (1e-3, 3e-3) for p in (0.0, 0.5, 0.8, 0.9)]
    grid = (grid * (k // len(grid) + 1))[:k]
    return [base.replace(p=p, lr=lr * (1 + i // 8), seed=(i if scenario == "seeds" else 0))
            for i, (p, lr) in enumerate(grid)]


def base_config(cache: str, mode: str, quick: bool):
    base = demo_configs(cache)["tail p=0"].replace(mode=mode, quiet=True)
    if quick:  # the demo's schedule shape, 10x shorter
        base = base.replace(steps=30, eval_every=15, traj_start=15, lr_decay_steps=(20,))
    return base


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_memory(k: int, cache: str, mode: str) -> None:
    """(in a fresh process) a group of k for 5 steps; prints its peak RSS and the estimate."""
    from linft.training.grouping import member_bytes
    from linft.training.pipeline import build_run
    base = base_config(cache, mode, True).replace(steps=5, eval_every=5, traj_start=1, lr_decay_steps=())
    cfgs = members(base, k, "shared")
    est = member_bytes(build_run(cfgs[0]))
    with tempfile.TemporaryDirectory() as root:
        train_group(cfgs, root)
    print(json.dumps(dict(kind="bench", bench="multirun_memory", mode=mode, K=k,
                          peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                          estimate_per_member_mib=round(est / 2**20, 1))), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="30 steps (eval every 15) instead of the demo's 300 (every 100)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="tail,linear")
    ap.add_argument("--scenarios", default="shared,seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "linft-bench-multirun-cache"))
    ap.add_argument("--memory", action="store_true", help="peak memory of K = 1, 4, 8, 16 instead")
    ap.add_argument("--peak", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if args.peak:
        return peak_memory(args.peak, args.cache, modes[0])
    with tempfile.TemporaryDirectory() as warm:  # the feature cache, once
        train(base_config(args.cache, modes[0], True).replace(steps=1, eval_every=1), warm)
    if args.memory:
        for k in (1, 4, 8, 16):
            subprocess.run([sys.executable, __file__, "--peak", str(k), "--modes", modes[0], "--cache", args.cache,
                            "--threads", str(args.threads)], check=False)
        return
    device = "CPU" if CPU else torch.cuda.get_device_name()
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; EfficientNet-Lite0 k=3, "
          f"Digits 32 px, cached features, batch 32, K={args.k}, {'quick' if args.quick else 'demo'} schedule",
          flush=True)
    for mode in modes:
        for scenario in args.scenarios.split(","):
            cfgs = members(base_config(args.cache, mode, args.quick), args.k, scenario)
            seq, grp = [], []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                    seq.append(timed(lambda: [train(c, a) for c in cfgs]))
                    grp.append(timed(lambda: train_group(cfgs, b)))
                    shutil.rmtree(a, ignore_errors=True)
            ratios = [s / g for s, g in zip(seq, grp)]
            steps = cfgs[0].steps * len(cfgs)
            print(json.dumps(dict(kind="bench", bench="multirun", mode=mode, scenario=scenario, K=args.k,
                                  steps=cfgs[0].steps, threads=torch.get_num_threads(),
                                  sequential_s=[round(t, 1) for t in seq], group_s=[round(t, 1) for t in grp],
                                  member_steps_per_s_sequential=round(steps / statistics.median(seq), 2),
                                  member_steps_per_s_group=round(steps / statistics.median(grp), 2),
                                  ratios=[round(r, 2) for r in ratios],
                                  throughput_vs_sequential=round(statistics.median(ratios), 2))), flush=True)


if __name__ == "__main__":
    main()
