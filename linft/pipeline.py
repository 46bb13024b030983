"""Build what one run trains, per mode: frozen parts ``pre`` (the trunk, which the feature cache
may replace) and ``post`` (no gradient, eval mode), and a *trainable* module, so that
``logits = trainable(post(pre(x)))``.

| mode     | pre (frozen)      | post (frozen)          | trainable                            |
|----------|-------------------|------------------------|--------------------------------------|
| full     | identity          | identity               | trunk -> tail -> head                |
| scratch  | identity          | identity               | same, from random weights            |
| tail     | trunk             | identity               | tail -> head                         |
| linear   | trunk             | identity               | Taylor model of tail -> head (core)  |
| unfolded | trunk             | tail blocks at w0      | Eq. (1): sum_i v_i * phi_i -> head   |
| probe    | trunk             | tail at w0             | head                                 |

BatchNorm is frozen everywhere (the "frozen" policy, recorded in the config).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from linft.backbones import BackboneSpec, build_backbone
from linft.config import RunConfig
from linft.core import DropoutHead, UnfoldedModel, block_features, freeze_batchnorm, linearize, split_network
from linft.core.surgery import Split


@dataclass
class Pipeline:
    pre: nn.Module               # frozen trunk (what the feature cache replaces), or nn.Identity
    post: nn.Module              # frozen part after the trunk (Eq. 1 blocks, probe's tail), or nn.Identity
    trainable: nn.Module
    head: DropoutHead            # inside ``trainable``: gets last_layer_lr_mult
    spec: BackboneSpec
    split: Split

    def head_parameter_ids(self) -> set[int]:
        return {id(p) for p in self.head.parameters()}


class _BlockFeatures(nn.Module):
    """tail blocks at w0 -> stacked pooled outputs [B, k, C] (Eq. 1's phi_i)."""

    def __init__(self, blocks: nn.Sequential):
        super().__init__()
        self.blocks = blocks

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return block_features(self.blocks, h)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_pipeline(cfg: RunConfig, num_classes: int, device: torch.device) -> Pipeline:
    """Fresh modules for ``cfg`` (deterministic given ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    name = cfg.backbone
    if cfg.mode == "scratch":
        name = name.split(".")[0] + ".random"
    model, spec = build_backbone(name)
    sp = split_network(model, cfg.k, num_classes, p=cfg.p)
    for part in (sp.trunk, sp.tail, sp.head):
        freeze_batchnorm(part)
    trunk = _frozen(sp.trunk) if cfg.mode not in ("full", "scratch") else sp.trunk
    post: nn.Module = nn.Identity()
    if cfg.mode in ("full", "scratch"):
        pre, trainable = nn.Identity(), sp.full()
    elif cfg.mode in ("tail", "linear"):
        pre, trainable = trunk, sp.tail_head()  # 'linear' is linearized after the head init
    elif cfg.mode == "unfolded":
        blocks = nn.Sequential(*[m for n, m in sp.tail.named_children() if n not in sp.layout.neck])
        pre, post = trunk, _frozen(_BlockFeatures(blocks))
        res = cfg.resolution or spec.resolution
        with torch.no_grad():
            _, k, width = post(pre(torch.zeros(1, 3, res, res))).shape
        trainable = UnfoldedModel([width] * k, num_classes, cfg.p)
        trainable.head = sp.head
    elif cfg.mode == "probe":
        pre, post, trainable = trunk, _frozen(sp.tail), sp.head
    else:  # pragma: no cover - validated by RunConfig
        raise AssertionError(cfg.mode)
    return Pipeline(pre.to(device), post.to(device), trainable.to(device), sp.head, spec, sp)


def finalize_trainable(pipe: Pipeline, cfg: RunConfig) -> None:
    """After the head is initialised (random or probed): linearize for mode 'linear'."""
    if cfg.mode == "linear":
        device = next(pipe.trainable.parameters()).device
        pipe.trainable = linearize(pipe.trainable, engine=cfg.lin_engine).to(device)
        pipe.head = pipe.trainable.get_submodule("1")
        # release the source tail + head (theta0 lives in the linearized module): one parameter copy less
        pipe.split = replace(pipe.split, tail=pipe.trainable.get_submodule("0"), head=pipe.head)
