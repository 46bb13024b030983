"""Read a DomainBed sweep output folder into a checkpoint frame (see linft.results.model_selection).

Like domainbed.lib.reporting.load_records: every subfolder's results.jsonl is read, whether or
not the run wrote ``done`` (kept as the ``done`` column); subfolders without results.jsonl
(jobs not started) are skipped.  Subfolders are read in sorted order (DomainBed: os.listdir).
Unlike DomainBed, a line that is not a JSON record (a torn last line of a running job) is an
error naming the file and line, not a traceback, and a folder with no results at all is an
error too.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import pandas as pd

from linft.errors import LinftError
from linft.results.model_selection import DOMAINBED_ENVIRONMENTS, FRAME_COLUMNS


def _env_names(dataset: str, n: int, envs: Mapping[str, Sequence[str]] | None, where: str) -> list[str]:
    names = (envs or {}).get(dataset) or DOMAINBED_ENVIRONMENTS.get(dataset)
    if names is None:
        return [f"env{i}" for i in range(n)]
    if len(names) < n:
        raise LinftError(f"{where}: dataset {dataset} has {n} envs but its env order {list(names)} "
                         f"names only {len(names)}")
    return list(names)


def read_domainbed_sweep(path: str | os.PathLike,
                         envs: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Checkpoint frame of a DomainBed sweep folder (``<path>/<run>/results.jsonl``).

    ``envs``: dataset -> env names in DomainBed's env index order; defaults to DomainBed's
    ENVIRONMENTS (VLCS: C, L, S, V; ...) and to "env{i}" for other datasets.  ``setting`` is
    str(hparams_seed), ``trial`` is trial_seed, ``method`` is the algorithm, ``run`` the
    subfolder name, ``done`` whether the run wrote ``done``.  frame.attrs["envs"] holds the env
    orders used (collect_results reads it when not given ``envs``).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LinftError(f"{path}: not a folder (expected a DomainBed sweep output folder)")
    rows, orders = [], {}
    for sub in sorted(os.listdir(path)):
        results = os.path.join(path, sub, "results.jsonl")
        if not os.path.isfile(results):
            continue
        done = os.path.exists(os.path.join(path, sub, "done"))
        with open(results, "r") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{results}:{lineno}"
                try:
                    rec = json.loads(line)
                    args = rec["args"]
                    dataset, test_envs = str(args["dataset"]), [int(e) for e in args["test_envs"]]
                    meta = (str(args["algorithm"]), dataset, args["trial_seed"],
                            str(args["hparams_seed"]), int(rec["step"]))
                except json.JSONDecodeError as e:
                    raise LinftError(f"{where}: not a complete JSON record ({e.msg}); a torn line "
                                     f"from a job that is still writing?") from None
                except (KeyError, TypeError, ValueError) as e:
                    raise LinftError(f"{where}: not a DomainBed record (missing or bad {e})") from None
                n = 0
                while f"env{n}_out_acc" in rec:
                    n += 1
                names = _env_names(dataset, n, envs, where)
                if any(not 0 <= e < n for e in test_envs):
                    raise LinftError(f"{where}: test_envs {test_envs} outside the {n} envs of the record")
                orders.setdefault(dataset, tuple(names))
                method, _, trial, setting, step = meta
                tenv = tuple(names[e] for e in test_envs)
                for i in range(n):
                    for split in ("in", "out"):
                        key = f"env{i}_{split}_acc"
                        if key in rec:
                            rows.append((method, dataset, tenv, trial, setting, sub, step,
                                         names[i], split, float(rec[key]), done))
    if not rows:
        raise LinftError(f"{path}: no results — no subfolder holds a results.jsonl with records "
                         f"(expected <sweep>/<run>/results.jsonl)")
    frame = pd.DataFrame(rows, columns=[*FRAME_COLUMNS, "done"])
    frame.attrs["envs"] = orders
    return frame
