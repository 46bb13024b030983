"""Named experiments as grids of run configs, and a local launcher.

An experiment is a TOML file (``experiments/<name>.toml``): a ``[base]`` RunConfig, a ``[grid]``
whose lists are crossed (itertools.product, in file order; an axis whose values are tables, e.g.
``cases = [{mode = "tail", feature_cache = true}, {mode = "full"}]``, sets several fields per
value), and optional ``[variants.<v>]`` tables
that override ``base`` and ``grid`` (``variants.offline`` runs on the embedded default). Runs are
the truth: ``status`` reads run folders, never a queue; ``launch`` skips what is done, and a failed
run never stops the others. A run that another process is training (it holds the run's lock: a
second launch of the same sweep, a ``linft train`` by hand) is skipped, reported, and counted as
running; each run is trained by one process at a time.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from linft.runs.config import RunConfig
from linft.errors import ConfigError, LinftError
from linft.runs.store import lock_holder, run_state

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


@dataclass
class Experiment:
    name: str
    description: str
    figure: str
    configs: list[RunConfig] = field(default_factory=list)


def find_experiment(name: str) -> Path:
    """A path, or a name looked up in ./experiments and linft's own experiments folder."""
    for cand in (Path(name), Path("experiments") / f"{name}.toml", EXPERIMENTS_DIR / f"{name}.toml"):
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")) if EXPERIMENTS_DIR.is_dir() else []
    raise LinftError(f"unknown experiment {name!r}; known: {', '.join(known) or 'none'}")


def load_experiment(name: str, variant: str = "paper", **overrides) -> Experiment:
    """The experiment's configs; ``overrides`` (e.g. data_root, cache_dir) apply to every config."""
    path = find_experiment(name)
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    base, grid = dict(spec.get("base", {})), dict(spec.get("grid", {}))
    if variant != "paper":
        if variant not in spec.get("variants", {}):
            raise ConfigError(f"experiment {path.stem!r} has no variant {variant!r}; "
                              f"it has: paper, {', '.join(spec.get('variants', {}))}")
        var = dict(spec["variants"][variant])
        grid.update(var.pop("grid", {}))
        base.update(var)
    axes = list(grid.items())
    configs, seen = [], set()
    for values in itertools.product(*[v for _, v in axes]):
        point: dict = {}
        for (key, _), value in zip(axes, values):  # a table on an axis ("cases") sets several fields at once
            point.update(value if isinstance(value, dict) else {key: value})
        cfg = RunConfig.from_dict({**base, **point, **overrides})
        if cfg.run_id not in seen:  # two grid points may be the same run (e.g. p ignored by a mode)
            seen.add(cfg.run_id)
            configs.append(cfg)
    return Experiment(path.stem, spec.get("description", ""), spec.get("figure", ""), configs)


def status(exp: Experiment, root: str | Path) -> dict[str, list[RunConfig]]:
    out: dict[str, list[RunConfig]] = {"done": [], "running": [], "failed": [], "missing": []}
    for cfg in exp.configs:
        state = run_state(Path(root) / cfg.run_id)
        out["missing" if state == "new" else state].append(cfg)
    return out


def _train_command(cfg: RunConfig, root: Path) -> list[str]:
    cfg_file = root / ".sweep" / f"{cfg.run_id}.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return [sys.executable, "-m", "linft.cli", "train", "--config", str(cfg_file), "--root", str(root)]


def _group_command(group: list[RunConfig], root: Path) -> tuple[list[str], str]:
    name = "group-" + "+".join(sorted(c.run_id for c in group))[:80]
    cfg_file = root / ".sweep" / f"{name}.json"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(json.dumps([c.to_dict() for c in group]))
    return [sys.executable, "-m", "linft.training.group", str(cfg_file), str(root)], name


def plan(configs: list[RunConfig], vectorize: int = 1, say=print) -> list[list[RunConfig]]:
    """The launch units: runs alone, or (``vectorize`` K > 1) groups of at most K runs that differ only
    in seed, p, lr, weight decay and last_layer_lr_mult, each trained in one vectorised pass
    (:mod:`linft.training.group`); runs that cannot be vectorised run alone, and ``say`` tells why."""
    if vectorize < 1:
        raise ConfigError(f"--vectorize takes K >= 1, got {vectorize}")
    if vectorize == 1:
        return [[c] for c in configs]
    from linft.training.grouping import make_groups, why_not_vectorisable
    groups, alone = make_groups(configs, vectorize)
    for c in alone:
        say(f"{c.run_id}: runs alone ({why_not_vectorisable(c) or 'no other run shares its group'})")
    return groups + [[c] for c in alone]


def launch(exp: Experiment, root: str | Path, jobs: int = 1, quiet: bool = False, vectorize: int = 1) -> dict[str, int]:
    """Run every run that is not done, ``jobs`` processes at a time (one per GPU when there are
    GPUs and ``jobs`` equals their number); ``vectorize`` K > 1 trains groups of up to K runs in one
    process each (:func:`plan`). Returns counts of done / failed after the launch.

    Each process's output goes to ``<root>/.sweep/<run id or group>.log`` as it happens: one line per
    evaluation (unbuffered; no progress bar, as the log is no terminal); ``quiet`` silences the runs.
    This process prints one line per finished process on stdout (a bar too when stderr is a terminal)."""
    root = Path(root)
    todo = [c.replace(quiet=quiet or c.quiet) for c in exp.configs if run_state(root / c.run_id) != "done"]
    units = plan(todo, vectorize)
    n_gpu = _gpu_count()
    running: list[tuple[subprocess.Popen, RunConfig]] = []
    failed = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=len(units), desc=f"sweep {exp.name}", unit="run" if vectorize == 1 else "job",
               disable=not sys.stderr.isatty())
    slot = 0
    for unit in units:
        while len(running) >= jobs:
            failed += _reap(running, bar)
        free = []
        for cfg in unit:  # taken or finished by another launch meanwhile
            holder = lock_holder(root / cfg.run_id)
            if holder:
                bar.write(f"  skipped {cfg.run_id}: being trained by {holder}")
            elif run_state(root / cfg.run_id) != "done":
                free.append(cfg)
        if not free:
            bar.update(1)
            continue
        unit = free
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if n_gpu and jobs > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % n_gpu)
        if jobs > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        slot += 1
        cmd, name = _train_command(unit[0], root), unit[0].run_id
        if len(unit) > 1:
            cmd, name = _group_command(unit, root)
        (root / ".sweep").mkdir(parents=True, exist_ok=True)
        log = open(root / ".sweep" / f"{name}.log", "w")
        running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), unit[0]))
        log.close()  # the child holds its own descriptor
    while running:
        failed += _reap(running, bar)
    bar.close()
    st = status(exp, root)
    return {k: len(v) for k, v in st.items()}


def _reap(running, bar) -> int:
    import time
    while True:
        for i, (proc, cfg) in enumerate(running):
            if proc.poll() is not None:
                running.pop(i)
                bar.update(1)
                bar.finished = getattr(bar, "finished", 0) + 1
                state = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                bar.write(f"sweep: {cfg.run_id} {state} ({bar.finished}/{bar.total})", file=sys.stdout)
                sys.stdout.flush()
                return int(proc.returncode != 0)
        time.sleep(0.2)


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


def delete_incomplete(exp: Experiment, root: str | Path) -> list[str]:
    """Remove the folders of this experiment's runs that are not done (failed or interrupted)."""
    removed = []
    for cfg in exp.configs:
        path = Path(root) / cfg.run_id
        if path.exists() and run_state(path) != "done" and not lock_holder(path):  # never a run in training
            shutil.rmtree(path)
            removed.append(cfg.run_id)
    return removed
