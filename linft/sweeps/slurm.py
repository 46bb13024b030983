"""Slurm launcher for sweeps, built on submitit: one job-array task per run, requeued on preemption
or timeout, resuming from the run's own checkpoint.

    linft sweep launch EXP --root runs --launcher slurm --partition gpu --gpus-per-job 1 \\
        --cpus-per-job 8 --mem-gb 32 --time-min 240 --array-parallelism 16

The run folders stay the truth (``linft sweep status`` reads them, never the queue). A job is a
:class:`TrainRun`, a ``submitit.helpers.Checkpointable``: when Slurm signals preemption or the
coming time limit, submitit calls :meth:`TrainRun.checkpoint`, which resubmits the same run; since a
linft run resumes from ``checkpoint.pt`` in its folder (bit-identical on CPU), relaunching the same
config is all a requeue needs. Set ``checkpoint_every`` (not semantic) to lose fewer steps than one
evaluation interval. Each run folder gets ``slurm.out`` / ``slurm.err`` symlinks to submitit's logs
(kept in ``<root>/.submitit/``). ``--gpus-per-job N`` (N > 1) runs the run under
``torchrun --standalone --nproc_per_node N`` inside the job (one node; see linft.training.distributed).

One process trains a run at a time (the run's lock, :class:`~linft.runs.store.RunLock`): a job
whose run is held by another process (the sweep was launched twice) returns "running" at once and
trains nothing; a requeued job takes over the lock of its predecessor, which the kernel released
when that process died.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from linft.runs.config import RunConfig
from linft.errors import LinftError
from linft.runs.store import RunLocked, lock_holder, run_state

try:  # submitit is needed by this launcher only
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    submitit = None
    Checkpointable = object  # type: ignore[misc,assignment]


@dataclass(frozen=True)
class SlurmOptions:
    """Per-job resources (every run of the sweep gets the same)."""

    partition: str = ""
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem_gb: int = 32
    time_min: int = 240
    array_parallelism: int = 64      # at most this many array tasks run at once
    max_requeues: int = 10           # timeouts a run may be requeued after (preemptions are free)
    cluster: str = "slurm"           # "local": submitit's local executor (tests, debugging)
    signal_delay_s: int = 120        # Slurm signals the job this long before its time limit
    extra: tuple[tuple[str, str], ...] = ()  # other sbatch options, e.g. (("account", "abc"),)


class TrainRun(Checkpointable):
    """One run as a submitit job: train (or resume, or return at once if done) ``config`` under ``root``."""

    def __init__(self, config: dict, root: str, gpus: int = 1):
        self.config, self.root, self.gpus = config, str(root), gpus

    def __call__(self) -> str:
        from linft.runs.store import run_state
        # not quiet: the run's evaluation lines stream into the job's log as they happen (no bar: no terminal)
        cfg = RunConfig.from_dict(self.config)
        if self.gpus > 1:
            cfg_file = Path(self.root) / ".sweep" / f"{cfg.run_id}.json"
            cfg_file.parent.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(json.dumps(cfg.to_dict()))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.gpus), "-m", "linft.cli", "train", "--config", str(cfg_file), "--root", self.root]
            subprocess.run(cmd, check=False)
        else:
            from linft.training.launch import RunFailed, train
            try:
                train(cfg, self.root)
            except RunFailed:
                pass  # the run folder holds the reason ("failed"); the job itself succeeded
            except RunLocked as e:
                print(f"linft: {e}", file=sys.stderr)
                return "running"  # another process trains it; this job has nothing to do
        return run_state(Path(self.root) / cfg.run_id)

    def checkpoint(self, *args, **kwargs):
        # The run checkpoints itself (checkpoint.pt in its folder): resubmitting it resumes there.
        return submitit.helpers.DelayedSubmission(TrainRun(self.config, self.root, self.gpus))


class TrainGroup(Checkpointable):
    """One vectorised group (``linft sweep launch --vectorize K``) as a submitit job: its runs train
    in one pass (:mod:`linft.training.group`); a requeued job resumes each from its checkpoint."""

    def __init__(self, configs: list[dict], root: str):
        self.configs, self.root = configs, str(root)

    def __call__(self) -> list[str]:
        from linft.training.group import train_group
        cfgs = [RunConfig.from_dict(c) for c in self.configs]  # not quiet: the job log gets the lines
        train_group(cfgs, self.root)
        return [run_state(Path(self.root) / c.run_id) for c in cfgs]

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(TrainGroup(self.configs, self.root))


def make_executor(folder: str | Path, opts: SlurmOptions, name: str = "linft"):
    if submitit is None:  # pragma: no cover
        raise LinftError("the Slurm launcher needs submitit: pip install submitit")
    if opts.cluster == "slurm" and not _has_sbatch():
        raise LinftError("no Slurm here (sbatch not found); use --launcher local")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster, slurm_max_num_timeout=opts.max_requeues)
    params = dict(name=name, timeout_min=opts.time_min, cpus_per_task=opts.cpus_per_job, mem_gb=opts.mem_gb,
                  nodes=1, tasks_per_node=1, gpus_per_node=opts.gpus_per_job,
                  slurm_array_parallelism=opts.array_parallelism, slurm_signal_delay_s=opts.signal_delay_s)
    if opts.partition:
        params["slurm_partition"] = opts.partition
    if opts.extra:
        params["slurm_additional_parameters"] = dict(opts.extra)
    if opts.cluster == "local":
        params["gpus_per_node"] = 0 if opts.gpus_per_job <= 1 and not _cuda() else opts.gpus_per_job
    ex.update_parameters(**params)
    return ex


def launch_slurm(exp, root: str | Path, opts: SlurmOptions, configs: list[RunConfig] | None = None,
                 vectorize: int = 1) -> list:
    """Submit every run of ``exp`` that is not done as one job array; returns the submitit jobs.

    Runs already done are skipped, and so are runs that a live process is training (it holds their
    lock); a run that was interrupted is resubmitted and resumes from its checkpoint. A run queued
    twice is trained once: the second job to start finds it locked or done.
    ``vectorize`` K > 1: one array task trains a group of up to K runs (linft.sweeps.grid.plan)."""
    from linft.sweeps.grid import plan
    root = Path(root).resolve()
    todo = [c for c in (configs if configs is not None else exp.configs)
            if run_state(root / c.run_id) != "done" and not lock_holder(root / c.run_id)]
    if not todo:
        return []
    units = plan(todo, vectorize)
    ex = make_executor(root / ".submitit", opts, name=f"linft-{exp.name}")
    jobs = ex.submit_array([TrainGroup([c.to_dict() for c in u], str(root)) if len(u) > 1
                            else TrainRun(u[0].to_dict(), str(root), opts.gpus_per_job) for u in units])
    for unit, job in zip(units, jobs):
        for cfg in unit:
            link_logs(root / cfg.run_id, job)
    return jobs


def link_logs(run_path: Path, job) -> None:
    """``slurm.out`` / ``slurm.err`` in the run folder -> the job's submitit logs (the latest job)."""
    run_path.mkdir(parents=True, exist_ok=True)
    for name, target in (("slurm.out", job.paths.stdout), ("slurm.err", job.paths.stderr)):
        link = run_path / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)


def _has_sbatch() -> bool:
    import shutil
    return shutil.which("sbatch") is not None


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


# -- command line (linft sweep launch --launcher slurm) ------------------------------------------
def add_launcher_flags(p) -> None:
    d = SlurmOptions()
    p.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local: subprocesses here (default); slurm: one submitit job-array task per run; "
                        "submitit-local: the same jobs through submitit's local executor (debugging)")
    p.add_argument("--partition", default=d.partition, help="[slurm] partition")
    p.add_argument("--gpus-per-job", type=int, default=d.gpus_per_job,
                   help="[slurm] GPUs per run; > 1 runs it under torchrun on one node")
    p.add_argument("--cpus-per-job", type=int, default=d.cpus_per_job, help="[slurm] CPUs per run")
    p.add_argument("--mem-gb", type=int, default=d.mem_gb, help="[slurm] memory per run (GB)")
    p.add_argument("--time-min", type=int, default=d.time_min,
                   help="[slurm] time limit per job; runs past it are requeued and resume")
    p.add_argument("--array-parallelism", type=int, default=d.array_parallelism,
                   help="[slurm] at most this many runs at once")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="[slurm] any other sbatch option, e.g. account=abc (repeatable)")
    p.add_argument("--wait", action="store_true", help="[slurm] wait for the jobs and print the sweep's status")


def launch_cli(exp, args) -> int:
    extra = []
    for item in args.slurm_option:
        if "=" not in item:
            raise LinftError(f"--slurm-option takes KEY=VALUE, got {item!r}")
        extra.append(tuple(item.split("=", 1)))
    opts = SlurmOptions(partition=args.partition, gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job,
                        mem_gb=args.mem_gb, time_min=args.time_min, array_parallelism=args.array_parallelism,
                        cluster="local" if args.launcher == "submitit-local" else "slurm", extra=tuple(extra))
    jobs = launch_slurm(exp, args.root, opts, vectorize=getattr(args, "vectorize", 1))
    print(f"{exp.name} [{args.variant}]: submitted {len(jobs)} run(s)" +
          (f" as job array {jobs[0].job_id.split('_')[0]}" if jobs else " (all done)") +
          f"; logs in {Path(args.root) / '.submitit'}; `linft sweep status` follows them")
    if args.wait or args.launcher == "submitit-local":  # local jobs die with this process: wait
        for job in jobs:
            job.wait()
        from linft.sweeps.grid import status
        st = status(exp, args.root)
        print("  ".join(f"{k} {len(v)}" for k, v in st.items()))
        return 0 if len(st["done"]) == len(exp.configs) else 1
    return 0
