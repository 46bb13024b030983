"""The paper's "unfolded" linear model, Eq. (1) ([ZB] Sec. 3):

    Phi~(x) = sum_i v_i * phi_i(x; w0),    y = V dropout(Phi~(x)) + b

phi_i is block i's output at the pre-trained weights w0, average-pooled and normalised; v_i are
trainable per-unit vectors (initialised to 1, so Phi~ starts as the sum of normalised block
outputs); V, b the classifier. It is the paper's simplification of the Taylor model for ReLU
ResNets, where short paths through skip connections dominate and skips join same-index units, so
every block in the sum must have the same width (ResNet50 layer4: three blocks of 2048 units).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from linft.core.heads import DropoutHead
from linft.errors import ConfigError


class UnfoldedModel(nn.Module):
    """Eq. (1) on precomputed block features ``phis`` [B, k, C] -> logits [B, num_classes].

    ``scale`` [k, C] normalises each phi_i; :meth:`calibrate` sets it to 1 / RMS of phi_i over a
    batch (one scalar per block, so that every block enters the sum at the same magnitude).
    """

    def __init__(self, block_dims: list[int], num_classes: int, p: float = 0.0, head_init: str = "random"):
        super().__init__()
        if not block_dims:
            raise ConfigError("the unfolded model needs at least one block (k >= 1)")
        if len(set(block_dims)) != 1:
            raise ConfigError(f"the unfolded model (Eq. 1) sums blocks of equal width; the tail's blocks have "
                              f"widths {block_dims}: choose k so that the last k blocks share one width")
        k, c = len(block_dims), block_dims[0]
        self.v = nn.Parameter(torch.ones(k, c))
        self.register_buffer("scale", torch.ones(k, 1))
        self.head = DropoutHead(c, num_classes, p, init=head_init)

    @torch.no_grad()
    def calibrate(self, phis: torch.Tensor) -> "UnfoldedModel":
        """Set the per-block normalisation from a batch ``phis`` [B, k, C]."""
        rms = phis.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-12)
        self.scale.copy_((1.0 / rms).unsqueeze(1))
        return self

    def representation(self, phis: torch.Tensor) -> torch.Tensor:
        """Phi~ [B, C]."""
        return (self.v * self.scale * phis).sum(dim=1)

    def forward(self, phis: torch.Tensor) -> torch.Tensor:
        return self.head(self.representation(phis))


def block_features(tail: nn.Sequential, h: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
    """phi_i(x; w0) for the tail's first ``n_blocks`` children (default: all): [B, k, C].

    Runs under no_grad with the tail as given (put it in eval mode: frozen BatchNorm).
    """
    from linft.core.surgery import pooled_block_outputs
    outs = pooled_block_outputs(tail, h)
    outs = outs[:n_blocks] if n_blocks is not None else outs
    dims = [o.shape[1] for o in outs]
    if len(set(dims)) != 1:
        raise ConfigError(f"the unfolded model (Eq. 1) sums blocks of equal width; got widths {dims}")
    return torch.stack(outs, dim=1)
