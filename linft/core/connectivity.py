"""Linear connectivity: interpolation grids with exact endpoints, adaptive refinement around the
maximum, and loss / error barriers under both definitions (paper_notes.md section 6).

For endpoint values L(0), L(1) and a curve L(a) on a grid containing 0 and 1:

    line:  B = max_a [ L(a) - ((1 - a) L(0) + a L(1)) ]   (w.r.t. the chord; >= 0 with the endpoints on the grid, 0: no barrier)
    mean:  B = max_a L(a) - (L(0) + L(1)) / 2             (w.r.t. the endpoint mean, Frankle et al.)

Pure torch/stdlib; parameters are interpolated with :func:`linft.core.params.lerp` (exact endpoints,
nothing mutated) and evaluated by the caller (``torch.func.functional_call``).
"""
from __future__ import annotations

from typing import Callable, Mapping

DEFINITIONS = ("line", "mean")


def uniform_grid(n: int = 11) -> list[float]:
    """``n >= 2`` evenly spaced points of [0, 1] with both endpoints exactly 0.0 and 1.0."""
    if n < 2:
        raise ValueError(f"an interpolation grid needs at least 2 points, got {n}")
    return [0.0] + [i / (n - 1) for i in range(1, n - 1)] + [1.0]


def chord_excess(curve: Mapping[float, float]) -> dict[float, float]:
    """``L(a) - ((1 - a) L(0) + a L(1))`` at every point of ``curve`` (which must hold 0 and 1)."""
    l0, l1 = curve[0.0], curve[1.0]
    return {a: v - ((1 - a) * l0 + a * l1) for a, v in curve.items()}


def barrier(curve: Mapping[float, float], definition: str = "line") -> tuple[float, float]:
    """``(barrier, argmax alpha)`` of ``curve`` (alpha -> value, endpoints included) under
    ``definition`` "line" or "mean" (module docstring)."""
    if 0.0 not in curve or 1.0 not in curve:
        raise ValueError("a barrier needs the curve at both endpoints a = 0 and a = 1")
    if definition == "line":
        score = chord_excess(curve)
        best = max(sorted(score), key=lambda a: score[a])
        return score[best], best
    if definition == "mean":
        best = max(sorted(curve), key=lambda a: curve[a])
        return curve[best] - (curve[0.0] + curve[1.0]) / 2, best
    raise ValueError(f"barrier definition must be one of {DEFINITIONS}, got {definition!r}")


def refine_max(score: Callable[[float], float], points: Mapping[float, float], min_spacing: float = 1 / 80,
               max_new: int = 32) -> dict[float, float]:
    """Bisect around the argmax of ``score``: evaluate the midpoints of the two intervals next to
    the current best point until both are shorter than ``min_spacing`` (or ``max_new`` new points).

    ``points``: already known ``alpha -> score`` (the grid). Returns all points, old and new.
    A peak narrower than the grid spacing is found when the grid samples its flank (any method
    needs that); a smooth maximum is located to ``min_spacing``.
    """
    pts = dict(points)
    new = 0
    while new < max_new:
        alphas = sorted(pts)
        i = max(range(len(alphas)), key=lambda j: (pts[alphas[j]], -j))
        mids = [(alphas[j] + alphas[j + 1]) / 2 for j in (i - 1, i) if 0 <= j < len(alphas) - 1
                and alphas[j + 1] - alphas[j] >= min_spacing]
        mids = [m for m in mids if m not in pts]
        if not mids:
            break
        for m in mids[:max_new - new]:
            pts[m] = score(m)
            new += 1
    return pts
