"""Where a run is trained: the one dispatch on process count, above both trainers.

- one process: :class:`~linft.training.trainer.Trainer`;
- one rank of a torchrun job (``WORLD_SIZE > 1`` in the environment): the distributed trainer
  (:func:`~linft.training.distributed.train_distributed`, which joins the process group);
- :func:`spawn_train`: several local CPU processes (gloo) started from here, for tests and debugging.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from linft.runs.config import RunConfig
from linft.runs.store import RunDir
from linft.training.distributed import train_distributed
from linft.training.trainer import RunFailed, Trainer

__all__ = ["RunFailed", "train", "spawn_train"]


def train(cfg: RunConfig, root: str | Path) -> RunDir:
    """Train (or resume, or return at once if done) the run of ``cfg`` under ``root``."""
    rd = RunDir(root, cfg)
    if rd.done:
        return rd
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return train_distributed(cfg, root)
    return Trainer(cfg, root).run()


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
