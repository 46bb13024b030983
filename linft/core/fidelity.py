"""How well a first-order Taylor model f_lin reproduces the network f: logit R^2, prediction
agreement, relative error, and the second-order residual estimated by halving the displacement.

All inputs are logits ``[N, C]`` over one split (f, f_lin and f0 = f(theta0) on the same
examples); every statistic is computed in float64 over the whole split:

  - ``r2``: 1 - sum (f - f_lin)^2 / sum (f - mean_f)^2, entrywise over the [N, C] block with
    mean_f the per-class (column) mean of f over the split -- the fraction of the variance of the
    logits that the Taylor model explains;
  - ``agreement``: fraction of examples with argmax f == argmax f_lin;
  - ``rel_err_l2`` = ||f - f_lin||_F / ||f - f0||_F (Frobenius norms over the split: the part of the
    function change the Taylor model misses), ``rel_err_l1`` the same with entrywise L1 norms;
  - ``residual_l2`` = ||f - f_lin||_F / sqrt(N) (RMS over examples of the per-example L2 norm),
    ``residual_l1`` = sum |f - f_lin| / N.

Halving (paper_notes.md section 1): with residual r(t) at theta0 + t (theta - theta0),
r(1) / r(1/2) ~ 4 for a smooth (quadratic) remainder; ReLU kinks give ~2^1.5 = 2.8 in L2 and
tend to 4 in L1.
"""
from __future__ import annotations

import math

import torch


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def r2(f: torch.Tensor, f_lin: torch.Tensor) -> float:
    f, g = _d(f), _d(f_lin)
    ss_tot = float(((f - f.mean(0, keepdim=True)) ** 2).sum())
    ss_res = float(((f - g) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else float("-inf")
    return 1.0 - ss_res / ss_tot


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def fidelity(f: torch.Tensor, f_lin: torch.Tensor, f0: torch.Tensor) -> dict[str, float]:
    """The statistics of the module docstring for one split."""
    f, g, f0 = _d(f), _d(f_lin), _d(f0)
    n = max(f.shape[0], 1)
    res, move = f - g, f - f0
    l2, l1 = float(res.norm()), float(res.abs().sum())
    return {"r2": r2(f, g), "agreement": agreement(f, g),
            "rel_err_l2": _ratio(l2, float(move.norm())), "rel_err_l1": _ratio(l1, float(move.abs().sum())),
            "residual_l2": l2 / math.sqrt(n), "residual_l1": l1 / n}


def halving_ratio(residual_full: float, residual_half: float) -> float:
    """r(t) / r(t/2): ~4 for a quadratic remainder, ~2.8 (L2) for ReLU kinks, ~2 if first order."""
    return _ratio(residual_full, residual_half)
