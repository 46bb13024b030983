"""`linft inspect`: build a backbone, split it, linearize its tail and check the Taylor model's
exactness at theta0 on the spot. The smallest real end-to-end use of the core."""
from __future__ import annotations

import time

import torch

from linft.models.backbones import build_backbone
from linft.core import count_parameters, freeze_batchnorm, linearize, split_network


def inspect_backbone(name: str, k: int, p: float, num_classes: int, resolution: int,
                     weights_file: str | None = None, batch: int = 4) -> dict:
    """Split ``name`` at ``k``, linearize tail + head, and measure f_lin(theta0) - f(theta0) in float64."""
    model, spec = build_backbone(name, weights_file)
    sp = split_network(model, k, num_classes, p=p)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = sp.trunk.eval()(x)
    tail_head = freeze_batchnorm(sp.tail_head()).double().eval()
    t = time.perf_counter()
    lin = linearize(tail_head).eval()
    gap = (lin(h.double()) - tail_head(h.double())).abs().max().item()
    return dict(backbone=spec.name, family=spec.family, k=k, p=p, tail=list(sp.tail._modules),
                trunk_output=list(h.shape[1:]), trunk_params=count_parameters(sp.trunk, False),
                tail_params=count_parameters(sp.tail), head_params=count_parameters(sp.head),
                taylor_gap_at_theta0=gap, seconds=round(time.perf_counter() - t, 3))
