"""The classification head of the paper: global average pool -> dropout(p) -> linear (Sec. 3).

Dropout sits on the pooled output of the last residual block (2048-d for ResNet50), the sum of
every block's contribution, so one mask touches all blocks. Inverted scaling m / (1 - p) in
training, identity at evaluation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from linft.errors import ConfigError

HEAD_INITS = ("random", "zeros")


def check_dropout_rate(p: float) -> float:
    """Return ``float(p)`` if it lies in [0, 1), else raise ConfigError (p = 1 drops everything)."""
    try:
        p = float(p)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"dropout rate must be a number in [0, 1), got {p!r}") from e
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout rate must lie in [0, 1), got {p}")
    return p


def dropout_mask(shape, p: float, *, dtype: torch.dtype, device, generator: torch.Generator | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The inverted-dropout mask m / (1 - p), m ~ Bernoulli(1 - p) per entry, of ``shape``: what
    ``F.dropout(x, p)`` multiplies ``x`` by. The one mask implementation of linft. Without
    ``generator`` it is drawn by ``F.dropout`` itself from the global RNG, consuming it exactly as
    :class:`DropoutHead` does (so a linearized model, a distributed rank and the network see the same
    masks for the same seed); with ``generator`` it is drawn from that generator. ``memory_format``:
    the layout the mask is drawn in (the draw fills memory in order, so it must match the input's)."""
    if p == 0:
        return torch.ones(shape, dtype=dtype, device=device)
    if generator is None:
        with torch.no_grad():
            ones = torch.ones(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
            return F.dropout(ones, p, True)
    keep = torch.rand(shape, generator=generator, device=device, dtype=dtype) >= p
    return keep.to(dtype) / (1.0 - p)


def pool(h: torch.Tensor) -> torch.Tensor:
    """Global average pool: [B, C, H, W] -> [B, C]; [B, C] passes through."""
    return h.mean(dim=(2, 3)) if h.dim() == 4 else h


class DropoutHead(nn.Module):
    """pool -> inverted dropout(p) -> Linear(in_features, num_classes).

    Input [B, C, H, W] (or already pooled [B, C]); output logits [B, num_classes].
    ``init="random"`` is torch's default Linear init (DomainBed's); ``"zeros"`` gives a zero
    classifier, under which the layers below receive *no* gradient at the first step (and a
    linearized tail never moves): use it only for a head trained alone (probe).
    """

    def __init__(self, in_features: int, num_classes: int, p: float = 0.0, init: str = "random"):
        super().__init__()
        self.p = check_dropout_rate(p)
        if init not in HEAD_INITS:
            raise ConfigError(f"head init must be one of {HEAD_INITS}, got {init!r}")
        self.fc = nn.Linear(in_features, num_classes)
        if init == "zeros":
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def representation(self, h: torch.Tensor) -> torch.Tensor:
        """The pooled representation Phi(x) the dropout acts on, [B, C]."""
        return pool(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.dropout(pool(h), self.p, self.training)  # one mask per example and unit
        return self.fc(z)

    def extra_repr(self) -> str:
        return f"p={self.p}"
