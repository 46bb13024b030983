"""Where a run is trained: the one dispatch on process count, above both trainers.

- one process: :class:`~linft.training.trainer.Trainer`;
- one rank of a torchrun job (``WORLD_SIZE > 1`` in the environment): the distributed trainer
  (:func:`~linft.training.distributed.train_distributed`, which joins the process group);
- :func:`spawn_train`: several local CPU processes (gloo) started from here, for tests and debugging.

One process trains a run at a time: :func:`train` holds the run's lock (``<run>/lock``, see
:class:`~linft.runs.store.RunLock`; rank 0 holds it for a multi-process run) and a second process
gets one :class:`~linft.runs.store.RunLocked` error naming the holder. The device is checked before
anything is built (``--device cuda`` on a machine without a GPU is one readable error).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from linft.errors import ConfigError
from linft.runs.config import RunConfig
from linft.runs.store import RunDir, RunLocked, read_run_config
from linft.training.distributed import train_distributed
from linft.training.trainer import RunFailed, Trainer

__all__ = ["RunFailed", "RunLocked", "check_device", "train", "spawn_train"]


def check_device(name: str) -> None:
    """ConfigError (one line) for a device that cannot be used here: an unknown name, ``cuda``
    without a visible GPU or with an index past the GPU count, ``mps`` where it is absent."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device {name!r}: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {name!r}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {name!r}: only {n} CUDA GPU(s) are visible here (cuda:0..cuda:{n - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r}: MPS is not available here; use --device cpu (or auto)")


def train(cfg: RunConfig, root: str | Path) -> RunDir:
    """Train (or resume, or return at once if done) the run of ``cfg`` under ``root``; RunLocked
    if another process is training it."""
    rd = RunDir(root, cfg)
    if (rd.path / "config.json").exists():
        read_run_config(rd.path)  # refuses a damaged config.json, or one edited by hand (another run id)
    if rd.done:
        return rd
    check_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 holds the lock; torchrun stops every rank if it fails
            return train_distributed(cfg, root)
        with rd.lock():  # every rank must enter train_distributed (collectives), even if it finds the run done
            return train_distributed(cfg, root)
    with rd.lock():
        return rd if rd.done else Trainer(cfg, root).run()


def _spawned(rank: int, world_size: int, port: int, configs: list[dict], root: str, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    try:
        for d in configs:
            train(RunConfig.from_dict(d), root)
    finally:
        dist.destroy_process_group()


def spawn_train(configs: Sequence[RunConfig], root: str | Path, world_size: int = 2, threads: int = 1) -> None:
    """Train ``configs`` one after the other, each with ``world_size`` CPU processes (gloo)."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(world_size, port, [c.to_dict() for c in configs], str(root), threads),
                       nprocs=world_size, start_method="spawn")
