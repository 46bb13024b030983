"""Training modes: one object per mode says what is frozen, what trains, where the head starts and
whether the trainable part is linearized ([ZB] Sec. 3-4; the linearized tail is the first-order
Taylor model of tail + head, the unfolded model is Eq. (1)). A new mode is one :class:`Mode` entry
in :data:`MODES`; every other module asks the mode object, never compares mode strings.

``parts(split, spec, cfg, num_classes)`` returns ``(pre, post, trainable)`` so that
``logits = trainable(post(pre(x)))``; ``pre`` (the frozen trunk) is what the feature cache replaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from linft.core import UnfoldedModel, block_features
from linft.core.surgery import Split


@dataclass(frozen=True)
class Mode:
    name: str
    trains: str                      # what trains, in words (shown by --help and in reports)
    frozen: str                      # what is held at the pre-trained weights
    trunk_trains: bool               # the trunk trains: no trunk-feature cache possible
    linearized: bool                 # trainable = first-order Taylor model around theta0
    random_weights: bool = False     # the backbone starts from random init, not the named weights
    head_is_trainable: bool = False  # the head is the whole trainable part (no LP-FT start)
    calibrate: bool = False          # trainable.calibrate(features) once before the first step
    parts: Callable | None = None    # (split, spec, cfg, num_classes) -> (pre, post, trainable)

    def head_input(self, split: Split, pre: nn.Module, post: nn.Module, trainable: nn.Module,
                   x: torch.Tensor) -> torch.Tensor:
        """The head's input at theta0 for images (or cached features) ``x`` [B, ...]: what a
        linear probe trains on."""
        if self.trunk_trains:
            return split.tail(split.trunk(x))
        if self.calibrate:
            return trainable.representation(post(pre(x)))
        return split.tail(pre(x))


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class BlockFeatures(nn.Module):
    """tail blocks at w0 -> stacked pooled outputs [B, k, C] (Eq. 1's phi_i)."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return block_features(self.blocks, h)


def _whole(sp: Split, spec, cfg, num_classes):
    return nn.Identity(), nn.Identity(), sp.full()


def _tail_head(sp: Split, spec, cfg, num_classes):
    return frozen(sp.trunk), nn.Identity(), sp.tail_head()  # 'linear' is linearized after the head init


def _unfolded(sp: Split, spec, cfg, num_classes):
    blocks = nn.Sequential(*[m for n, m in sp.tail.named_children() if n not in sp.layout.neck])
    pre, post = frozen(sp.trunk), frozen(BlockFeatures(blocks))
    res = cfg.resolution or spec.resolution
    with torch.no_grad():
        _, k, width = post(pre(torch.zeros(1, 3, res, res))).shape
    trainable = UnfoldedModel([width] * k, num_classes, cfg.p)
    if sp.head.fc.in_features == width:  # no neck: the backbone's new head (the other modes' init)
        trainable.head = sp.head
    # else (EfficientNet: blocks of 320 units, a neck to 1280): Eq. 1 sums the blocks' own outputs,
    # so the head is UnfoldedModel's, on the blocks' width
    return pre, post, trainable


def _head_only(sp: Split, spec, cfg, num_classes):
    return frozen(sp.trunk), frozen(sp.tail), sp.head


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("full", "every parameter", "nothing", trunk_trains=True, linearized=False, parts=_whole),
    Mode("scratch", "every parameter, from random init", "nothing", trunk_trains=True, linearized=False,
         random_weights=True, parts=_whole),
    Mode("tail", "last k blocks + head", "trunk", trunk_trains=False, linearized=False, parts=_tail_head),
    Mode("linear", "first-order Taylor model of last k blocks + head", "trunk", trunk_trains=False,
         linearized=True, parts=_tail_head),
    Mode("unfolded", "Eq. (1): per-block weights v_i of the pooled block outputs + head", "trunk, tail blocks",
         trunk_trains=False, linearized=False, calibrate=True, parts=_unfolded),
    Mode("probe", "head only", "trunk, tail", trunk_trains=False, linearized=False, head_is_trainable=True,
         parts=_head_only),
)}


def get_mode(name: str) -> Mode:
    from linft.errors import ConfigError
    if name not in MODES:
        raise ConfigError(f"mode must be one of {tuple(MODES)}, got {name!r}")
    return MODES[name]
