"""Build what one run trains, from its config alone (the trainer and every reader of a finished run
use these same builders): frozen parts ``pre`` (the trunk, which the feature cache may replace) and
``post`` (no gradient, eval mode), and a *trainable* module, so that
``logits = trainable(post(pre(x)))``. What each mode freezes and trains is said by its
:class:`~linft.runs.modes.Mode` object.

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
import torch.nn.functional as F

from linft.core import DropoutHead, freeze_batchnorm, linearize, split_network
from linft.core.surgery import Split
from linft.models.backbones import BackboneSpec, build_backbone
from linft.runs.config import RunConfig
from linft.runs.modes import get_mode
from linft.training.run_data import RunData


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_pipeline(cfg: RunConfig, num_classes: int, device: torch.device) -> Pipeline:
    """Fresh modules for ``cfg`` (deterministic given ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    mode = get_mode(cfg.mode)
    name = cfg.backbone.split(".")[0] + ".random" if mode.random_weights else cfg.backbone
    model, spec = build_backbone(name, None if mode.random_weights or not cfg.weights_file else cfg.weights_file)
    sp = split_network(model, cfg.k, num_classes, p=cfg.p, family=spec.family)
    for part in (sp.trunk, sp.tail, sp.head):
        freeze_batchnorm(part)
    pre, post, trainable = mode.parts(sp, spec, cfg, num_classes)
    return Pipeline(pre.to(device), post.to(device), trainable.to(device), sp.head, spec, sp)


@dataclass
class BuiltRun:
    """One run's data and modules at theta0 (before any head probing): what the trainer trains and
    what analyses of a finished run load weights into."""
    cfg: RunConfig
    device: torch.device
    data: RunData
    pipe: Pipeline


def build_run(cfg: RunConfig) -> BuiltRun:
    device = resolve_device(cfg.device)
    data = RunData(cfg, device)
    pipe = build_pipeline(cfg, data.num_classes, device)
    for part in (pipe.pre, pipe.post, pipe.trainable):
        part.to(memory_format=torch.channels_last)  # inputs follow (evaluate.channels_last)
    data.attach(pipe)
    return BuiltRun(cfg, device, data, pipe)


def probe_head(cfg: RunConfig, data: RunData, pipe: Pipeline, device: torch.device) -> None:
    """LP-FT: train the new head alone (probe_lr, else lr x10) on frozen features before anything else. Call it
    right after ``torch.manual_seed(cfg.seed)``, as the trainer does, to reproduce a run's theta0."""
    mode, head = get_mode(cfg.mode), pipe.head
    opt = torch.optim.SGD(head.parameters(), lr=cfg.probe_lr or cfg.lr * 10, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    stream = data.train_batches(start=0, stream="probe")
    was = head.training
    # dropout(p) only under probe_dropout, and then the head's own (after pooling: the trainer's kernel)
    head.train(cfg.probe_dropout)
    try:
        for _ in range(cfg.probe_steps):
            batches = next(stream)
            with torch.no_grad():
                x = torch.cat([b[0] for b in batches]).to(device)
                z = mode.head_input(pipe.split, pipe.pre, pipe.post, pipe.trainable, x)
            loss = F.cross_entropy(head(z), torch.cat([b[1] for b in batches]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        head.train(was)


def finalize_trainable(pipe: Pipeline, cfg: RunConfig) -> None:
    """After the head is initialised (random or probed): linearize a linearized mode's trainable part."""
    if get_mode(cfg.mode).linearized:
        device = next(pipe.trainable.parameters()).device
        pipe.trainable = linearize(pipe.trainable, engine=cfg.lin_engine).to(device)
        pipe.head = pipe.trainable.get_submodule("1")
        # release the source tail + head (theta0 lives in the linearized module): one parameter copy less
        pipe.split = replace(pipe.split, tail=pipe.trainable.get_submodule("0"), head=pipe.head)
