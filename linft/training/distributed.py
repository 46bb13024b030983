"""Multi-process (multi-GPU) runs under ``torchrun``, and sharded evaluation.

    torchrun --standalone --nproc_per_node 4 -m linft.cli train --config run.json --root runs

``linft.training.launch.train`` sees ``WORLD_SIZE > 1`` and calls :func:`train_distributed`. Every mode runs,
the linearized one included, and a W-process run equals the one-process run of the same config
(same global batch, same seed) up to the order of float reductions:

- **data**: each step's per-domain batch (``batch_size`` examples, the very ones a single process
  draws, with their augmentation seeds) is split by example, rank r taking examples ``r::W`` of every
  domain (the sampler's index list is sliced, so a rank loads only its share);
- **dropout**: every rank draws the *global* step's masks (shape ``[n_domains * batch_size, ...]``)
  from the same generator state a single process would use and keeps its rows (:class:`_GlobalDropout`,
  a ``TorchFunctionMode`` around ``F.dropout``). The one-pass tangent engine, ``torch.func.jvp`` and
  the standard modes all call ``F.dropout`` once per head, so the masks match in every mode and the
  generator stays in step with the single-process run (and with the checkpointed RNG state);
- **loss** = global mean: each rank's summed cross-entropy / global batch size; **gradients** are
  summed with one explicit ``all_reduce`` over a flattened bucket after ``backward()``.

Why an explicit all-reduce and not the ``DistributedDataParallel`` wrapper, for every mode: DDP
hooks its reducer into the wrapper's ``forward`` and autograd, and ``torch.func.jvp`` over
``functional_call`` through a DDP wrapper fails (pytorch#94896, #182661); the linearized model must
run unwrapped. One code path for all modes keeps them comparable (same reduction, same scaling:
DDP averages over ranks, which is only the global mean when every rank holds as many examples).
The cost is no overlap of communication with backward, which matters only for full fine-tuning of
large backbones across many GPUs.

Rank 0 alone writes rows, checkpoints, ``final.pt`` and the markers; every rank resumes from the same
checkpoint; parameters are broadcast from rank 0 at every evaluation (a no-op on CPU; on GPUs it
removes any drift from non-deterministic kernels). The head probe (LP-FT) and the unfolded mode's
calibration are cheap and run replicated on every rank with the full batch.

:func:`distributed_predict` shards an evaluation loader by whole batches (so each example sees the
same batch composition as in one process: bit-identical logits) and all-gathers the logits; the
interpolation analyses can call it in place of :func:`linft.training.evaluate.predict`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from linft.core.heads import dropout_mask
from linft.runs.config import RunConfig
from linft.errors import ConfigError
from linft.training.evaluate import channels_last, predict
from linft.runs.store import RunDir
from linft.training.trainer import Trainer

_OTHER_DROPOUTS = {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, or from torchrun's environment, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- data --------------------------------------------------------------------------------------
def local_rows(batch_size: int, n_domains: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of the single-process step batch (domains concatenated) that ``rank`` holds, in order."""
    return torch.cat([d * batch_size + torch.arange(rank, batch_size, world_size) for d in range(n_domains)])


# -- dropout -----------------------------------------------------------------------------------
class _GlobalDropout(TorchFunctionMode):
    """``F.dropout(x)`` on this rank's rows ``rows`` of a global batch of ``n`` examples: draws the
    global mask (same generator draws as one process) and multiplies ``x`` by its rows."""

    def __init__(self, rows: torch.Tensor, n: int):
        super().__init__()
        self.rows, self.n = rows, n

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if not training or p == 0.0 or x.numel() == 0:
                return func(*args, **kwargs)
            if x.shape[0] != len(self.rows):
                raise RuntimeError(f"dropout on a tensor of {x.shape[0]} rows, but this rank holds "
                                   f"{len(self.rows)} examples: per-example masks cannot be matched")
            mask = dropout_mask((self.n, *x.shape[1:]), p, dtype=x.dtype, device=x.device)
            mask = mask[self.rows.to(x.device)]
            return x.mul_(mask) if inplace else x * mask
        if func in _OTHER_DROPOUTS and kwargs.get("training", args[2] if len(args) > 2 else True):
            raise NotImplementedError(f"{func.__name__} in a distributed run (only F.dropout is matched)")
        return func(*args, **kwargs)


def _dropout_args(input, p=0.5, training=True, inplace=False):
    return input, p, training, inplace


# -- collectives -------------------------------------------------------------------------------
def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Sum ``.grad`` over ranks, in one flattened bucket per dtype/device (grads that are None stay
    None: every rank runs the same graph, so they are None on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    for gs in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat)
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def distributed_predict(pre: nn.Module, post: nn.Module, trainable: nn.Module, loader, device: torch.device,
                        params: dict[str, torch.Tensor] | None = None, autocast: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linft.training.evaluate.predict` with the loader's batches split over the ranks (batch i on rank
    ``i % world``); every rank gets all logits [N, C] (float64, CPU) and labels [N], in loader order.

    A collective: every rank must call it with the same loader. Without a process group (or for a
    loader that is not a DataLoader with a batch sampler) it is ``predict`` itself."""
    rank, ws = world()
    if not (dist.is_available() and dist.is_initialized()) or ws == 1 or \
            not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return predict(pre, post, trainable, loader, device, params, autocast)
    batches = [list(b) for b in loader.batch_sampler]
    mine = batches[rank::ws]
    # its own generator: starting an iterator must not draw from the global RNG (dropout masks)
    local = DataLoader(loader.dataset, batch_sampler=mine, num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(0))
    if mine:
        logits, labels = predict(pre, post, trainable, local, device, params, autocast)
    else:
        logits, labels = torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    cdev = _comm_device(device)
    width = torch.tensor([logits.shape[1]], device=cdev)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    c = int(width.item())
    counts = [sum(len(b) for b in batches[q::ws]) for q in range(ws)]
    m = max(counts)
    pad_lg = torch.zeros(m, c, dtype=torch.float64, device=cdev)
    pad_lb = torch.zeros(m, dtype=torch.long, device=cdev)
    if counts[rank]:
        pad_lg[:counts[rank]] = logits.to(cdev)
        pad_lb[:counts[rank]] = labels.to(cdev)
    got_lg = [torch.empty_like(pad_lg) for _ in range(ws)]
    got_lb = [torch.empty_like(pad_lb) for _ in range(ws)]
    dist.all_gather(got_lg, pad_lg)
    dist.all_gather(got_lb, pad_lb)
    out_lg, out_lb, cursor = [], [], [0] * ws
    for i, b in enumerate(batches):  # re-interleave: batch i came from rank i % ws
        q = i % ws
        out_lg.append(got_lg[q][cursor[q]:cursor[q] + len(b)])
        out_lb.append(got_lb[q][cursor[q]:cursor[q] + len(b)])
        cursor[q] += len(b)
    return torch.cat(out_lg).cpu(), torch.cat(out_lb).cpu()


# -- the trainer -------------------------------------------------------------------------------
class _ReadOnlyRunDir(RunDir):
    """What ranks other than 0 see of the run folder: reads work, writes do nothing."""

    @property
    def failed(self) -> str | None:
        return None

    def create(self) -> None:
        pass

    def mark_done(self) -> None:
        pass

    def mark_failed(self, reason: str) -> None:
        pass

    def append_rows(self, rows) -> None:
        pass

    def write_rows(self, rows) -> None:
        pass

    def truncate_rows(self, last_step: int) -> None:
        pass


class DistributedTrainer(Trainer):
    """:class:`~linft.training.trainer.Trainer` for one rank of a process group (see the module docstring)."""

    _predict = staticmethod(distributed_predict)

    def __init__(self, cfg: RunConfig, root: str | Path):
        if cfg.lin_primal_cache:
            raise ConfigError("lin_primal_cache runs in one process; set lin_primal_cache=false to distribute")
        super().__init__(cfg, root)
        self.rank, self.world_size = world()
        if self.rank != 0:
            self.run_dir = _ReadOnlyRunDir(root, cfg)
        self.data.shard = (self.rank, self.world_size)
        self._rows: torch.Tensor | None = None

    def _loss(self, module: nn.Module, batches) -> torch.Tensor:
        n_dom, bs = len(batches), self.cfg.batch_size
        if self._rows is None:
            self._rows = local_rows(bs, n_dom, self.rank, self.world_size)
        x = torch.cat([b[0] for b in batches]).to(self.device, non_blocking=True)
        y = torch.cat([b[1] for b in batches]).to(self.device, non_blocking=True)
        assert len(y) == len(self._rows), (len(y), len(self._rows))
        x = channels_last(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                z = self.pipe.post(self.pipe.pre(x))
            with _GlobalDropout(self._rows, n_dom * bs):
                out = module(z).float()
        local = F.cross_entropy(out, y, reduction="sum") / (n_dom * bs)
        total = local.detach().clone()
        dist.all_reduce(total)
        # value: the global mean loss (identical on every rank); gradient: this rank's share
        return local + (total - local.detach())

    def _sync_grads(self) -> None:
        all_reduce_grads(p for p in self.pipe.trainable.parameters() if p.requires_grad)

    def _evaluate(self, step: int) -> list[dict]:
        with torch.no_grad():
            for t in self.pipe.trainable.state_dict().values():
                dist.broadcast(t, 0)
        return super()._evaluate(step)

    def _save(self, step: int, opt, sched, running: tuple[float, int] = (0.0, 0)) -> None:
        if self.rank == 0:
            super()._save(step, opt, sched, running)

    def _save_final(self, final: dict) -> None:
        if self.rank == 0:
            super()._save_final(final)


def _device_for(cfg: RunConfig) -> tuple[str, str]:
    """(device, backend): one GPU per local rank with NCCL, else CPU with gloo."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        torch.cuda.set_device(local)
        return f"cuda:{local}", "nccl"
    return "cpu", "gloo"


def train_distributed(cfg: RunConfig, root: str | Path) -> RunDir:
    """Train ``cfg`` as one rank of a torchrun job (initialises and tears down the process group)."""
    device, backend = _device_for(cfg)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend)
    try:
        cfg = cfg.replace(device=device, quiet=cfg.quiet or dist.get_rank() != 0)
        DistributedTrainer(cfg, root).run()
        dist.barrier()  # rank 0 has written final.pt and done
        return RunDir(root, cfg)
    finally:
        if own:
            dist.destroy_process_group()
