"""Evaluation of one run's models on every environment's in/out split, as tidy rows; the
trajectory baselines that need no second training ([ZB] Sec. 4): trajectory weight averaging
(running mean of the iterates after ``traj_start``) and the trajectory ensemble (sum of the
logits of the models at every evaluation step from ``traj_start``)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

Key = tuple[str, str]  # (environment name, "in" | "out")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images and feature maps [B, C, H, W] in channels_last: convolutions run ~2x faster in it on
    CPU (oneDNN) and use tensor-core layouts on CUDA; the modules are converted to match."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict(pre: nn.Module, post: nn.Module, trainable: nn.Module, loader: Iterable, device: torch.device,
            params: dict[str, torch.Tensor] | None = None, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float64, CPU) and labels [N] over ``loader``; ``params`` evaluates ``trainable``
    at other parameters (functional_call; the module is not touched). Dropout is off (eval)."""
    was = trainable.training
    trainable.eval()
    outs, labels = [], []
    try:
        for x, y in loader:
            x = channels_last(x.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                z = post(pre(x))
                out = trainable(z) if params is None else functional_call(trainable, params, (z,))
            outs.append(out.double().cpu())
            labels.append(y.cpu())
    finally:
        trainable.train(was)
    return torch.cat(outs), torch.cat(labels)


def metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean cross-entropy (nats) and accuracy (fraction) of ``logits`` [N, C] against ``labels`` [N]."""
    return {"loss": F.cross_entropy(logits, labels).item(),
            "acc": (logits.argmax(1) == labels).double().mean().item()}


def eval_rows(run_id: str, step: int, model: str, key: Key, role: str, m: dict[str, float]) -> list[dict]:
    env, split = key
    return [dict(run=run_id, kind="eval", step=step, model=model, env=env, role=role, split=split,
                 metric=name, value=value) for name, value in m.items()]


class TrajectoryAverage:
    """Running mean of the trainable parameters after ``start`` (SWA-style, every step).

    BatchNorm is frozen, so buffers are shared by all iterates and need no averaging.
    """

    def __init__(self, start: int):
        self.start, self.count, self.mean = start, 0, None  # type: ignore[assignment]

    def update(self, step: int, module: nn.Module) -> None:
        if step <= self.start:
            return
        with torch.no_grad():
            params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
            if self.mean is None:
                self.mean = {n: p.clone().double() for n, p in params.items()}
            else:
                for n, p in params.items():
                    self.mean[n].add_(p.double() - self.mean[n], alpha=1.0 / (self.count + 1))
            self.count += 1

    def params(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        if self.mean is None:
            return None
        dtypes = {n: p.dtype for n, p in module.named_parameters()}
        return {n: t.to(dtypes[n]) for n, t in self.mean.items()}

    def state_dict(self) -> dict:
        return {"start": self.start, "count": self.count, "mean": self.mean}

    def load_state_dict(self, d: dict) -> None:
        self.start, self.count, self.mean = d["start"], d["count"], d["mean"]


class TrajectoryEnsemble:
    """Sum of the logits of the models at every evaluation step from ``start`` on, per eval split."""

    def __init__(self, start: int):
        self.start, self.members, self.sums = start, 0, {}  # type: ignore[var-annotated]

    def add(self, step: int, logits: dict[Key, torch.Tensor]) -> bool:
        if step < self.start:
            return False
        for key, lg in logits.items():
            self.sums[key] = self.sums.get(key, 0) + lg
        self.members += 1
        return True

    def logits(self, key: Key) -> torch.Tensor:
        return self.sums[key] / self.members  # the mean: same argmax as the sum, a calibrated loss

    def state_dict(self) -> dict:
        return {"start": self.start, "members": self.members,
                "sums": {f"{e}\x1f{s}": v for (e, s), v in self.sums.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.start, self.members = d["start"], d["members"]
        self.sums = {tuple(k.split("\x1f")): v for k, v in d["sums"].items()}
