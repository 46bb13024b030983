"""The offline study's analyses (paper_notes.md section 11), on every finished run of ROOT; finished
analyses are read back, not recomputed, so this can run again while the study is still training.

    python experiments/offline_study_analyses.py ROOT [--trajectory-seeds 0,1,2]

- the fixed-steps tails at p = 0 and 0.9 of ``--seeds`` (pre-trained and random-init trunk), at their
  final weights: post-hoc Taylor fidelity on 1,000 examples per split and the full [N, C, N, C]
  kernel distance on 16 probe examples (``trajectory --steps 1500``);
- the pre-trained tails of the trajectory seeds and sizes: the same at every snapshot along training;
- the trajectory seeds' tails at n = 1,000: the barrier from theta0 to theta_ft in the
  convex-combination form (``interp``, 11-point grid).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from linft.analysis.registry import analyze
from linft.errors import LinftError
from linft.results.collect import run_folders
from linft.runs.store import read_run_config, run_state

NTK = {"form": "full", "probe_size": 16}


def finished(root: Path) -> list:
    return [(f, read_run_config(f)) for f in run_folders(root) if run_state(f) == "done"]


def plan(runs: list, seeds: set, traj_seeds: set, traj_sizes: set) -> list:
    """The jobs in priority order: what the claims need first (paper_notes.md section 11)."""
    fixed = [(f, c) for f, c in runs if c.mode == "tail" and c.steps == 1500 and c.seed in seeds
             and c.head_init == "probe" and c.p in (0.0, 0.9)]
    fixed.sort(key=lambda fc: (not fc[1].backbone.endswith(".random"), fc[1].seed))  # the control first, then by seed
    final = {"steps": (1500,), "max_examples": 1000, **NTK}
    jobs = [("trajectory", [f], final) for f, c in fixed]  # final weights: Taylor error, kernel distance
    for f, c in fixed:
        if c.snapshot_steps and c.seed in traj_seeds and c.n_per_domain in traj_sizes:
            jobs.append(("trajectory", [f], {"max_examples": 1000, **NTK}))  # every snapshot
    for f, c in fixed:
        if c.seed in traj_seeds and c.n_per_domain == 1000 and c.backbone.endswith(".in1k"):
            jobs.append(("interp", [f], {"refine": False}))
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--seeds", default="0,1,2", help="seeds whose runs are analysed")
    ap.add_argument("--trajectory-seeds", default="0")
    ap.add_argument("--trajectory-sizes", default="100,1000,48000")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ints = lambda s: {int(v) for v in s.split(",") if v}
    jobs = plan(finished(args.root), ints(args.seeds), ints(args.trajectory_seeds), ints(args.trajectory_sizes))
    t0, failed = time.perf_counter(), 0
    for i, (kind, folders, options) in enumerate(jobs, 1):
        try:
            analyze(kind, [str(f) for f in folders], **options)
        except LinftError as e:
            failed += 1
            print(f"  {kind} {' '.join(f.name for f in folders)}: {e}", file=sys.stderr)
        print(f"[{time.perf_counter() - t0:6.0f} s] {i}/{len(jobs)} {kind} {folders[0].name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
