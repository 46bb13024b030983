"""Parameter-space arithmetic on named tensors (dicts name -> tensor): distances, deltas, cosines,
straight-line interpolation. Pure torch; never modifies its inputs.

Grouping ("layer" in the rows):
  - ``level="param"``: one parameter tensor, named as in ``named_parameters()``;
  - ``level="block"``: :func:`block_of` -- the first two components of the dotted name, i.e. the
    top-level child of the trained module and its child. For linft's trainable modules that is a
    residual block (``0.layer4_1`` in a tail run, ``1.layer4_1`` in a full run), a stem piece
    (``0.conv1``, ``0.bn1``) or the head's classifier (``1.fc`` / ``2.fc``). A name with only two
    components (``fc.weight``) is grouped under its first (``fc``);
  - ``level="total"``: every tensor together (``layer="total"``).
All sums are accumulated in float64.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

Params = Mapping[str, torch.Tensor]


def block_of(name: str, depth: int = 2) -> str:
    """The block a parameter belongs to: its first ``min(depth, n - 1)`` dotted components."""
    parts = name.split(".")
    return ".".join(parts[:max(1, min(depth, len(parts) - 1))])


def _sq(t: torch.Tensor) -> float:
    t = t.detach().double()
    return float((t * t).sum())


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() * b.detach().double()).sum())


def norm(params: Params, names=None) -> float:
    """Euclidean norm of the concatenation of ``params`` (restricted to ``names``)."""
    return math.sqrt(sum(_sq(params[n]) for n in (names if names is not None else params)))


def subtract(a: Params, b: Params) -> dict[str, torch.Tensor]:
    """``a - b`` by name (the names of ``a``; ``b`` must hold them all)."""
    missing = sorted(set(a) - set(b))
    if missing:
        raise KeyError(f"{len(missing)} parameters missing, e.g. {missing[:3]}")
    return {n: a[n].detach() - b[n].detach().to(a[n].dtype) for n in a}


def lerp(a: Params, b: Params, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) a + alpha b`` by name. ``alpha`` 0 and 1 return the endpoint tensors
    themselves (exact endpoints, no rounding); no input is modified."""
    if set(a) != set(b):
        raise KeyError("the two parameter sets have different names")
    if alpha == 0:
        return dict(a)
    if alpha == 1:
        return dict(b)
    return {n: (1 - alpha) * a[n].detach() + alpha * b[n].detach() for n in a}


def groups(names, group: Callable[[str], str] = block_of) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(group(n), []).append(n)
    return out


def _levels(names, group) -> list[tuple[str, str, list[str]]]:
    names = list(names)
    return ([("param", n, [n]) for n in names] + [("block", g, ns) for g, ns in groups(names, group).items()]
            + [("total", "total", names)])


def weight_distance(theta: Params, theta0: Params, group: Callable[[str], str] = block_of) -> list[dict]:
    """|theta - theta0| per parameter tensor, per block and in total, with |theta0| and the ratio.

    Returns dicts ``{level, layer, numel, distance, norm0, relative}`` where ``relative =
    distance / norm0`` (``nan`` when ``norm0 == 0``, e.g. a zero-initialised bias)."""
    d = subtract(theta, theta0)
    sq_d = {n: _sq(t) for n, t in d.items()}
    sq_0 = {n: _sq(theta0[n]) for n in d}
    out = []
    for level, layer, ns in _levels(d, group):
        dist, n0 = math.sqrt(sum(sq_d[n] for n in ns)), math.sqrt(sum(sq_0[n] for n in ns))
        out.append(dict(level=level, layer=layer, numel=sum(d[n].numel() for n in ns), distance=dist, norm0=n0,
                        relative=dist / n0 if n0 > 0 else float("nan")))
    return out


def delta_comparison(delta_a: Params, delta_b: Params, group: Callable[[str], str] = block_of) -> list[dict]:
    """Two fine-tuning deltas (theta_A - theta0, theta_B - theta0) compared per tensor, block, total:
    ``{level, layer, cosine, distance, norm_a, norm_b}`` (``distance = |delta_A - delta_B| =
    |theta_A - theta_B|`` when theta0 is shared; cosine ``nan`` if a delta is zero)."""
    if set(delta_a) != set(delta_b):
        raise KeyError("the two deltas have different parameter names")
    aa = {n: _sq(t) for n, t in delta_a.items()}
    bb = {n: _sq(delta_b[n]) for n in delta_a}
    ab = {n: _dot(delta_a[n], delta_b[n]) for n in delta_a}
    # |a - b| from the difference itself (float64): sqrt(|a|^2 + |b|^2 - 2 a.b) cancels
    # catastrophically for near-equal deltas (0.0 at a 1e-8 relative difference)
    dd = {n: _sq(delta_a[n].detach().double() - delta_b[n].detach().double()) for n in delta_a}
    out = []
    for level, layer, ns in _levels(delta_a, group):
        sa, sb, sab, sd = (sum(v[n] for n in ns) for v in (aa, bb, ab, dd))
        na, nb = math.sqrt(sa), math.sqrt(sb)
        cos = sab / (na * nb) if na > 0 and nb > 0 else float("nan")
        out.append(dict(level=level, layer=layer, cosine=cos, distance=math.sqrt(sd),
                        norm_a=na, norm_b=nb))
    return out


def differing(a: Params, b: Params, names=None) -> list[str]:
    """Names (among ``names``, default all of ``a``'s) whose tensors are not bit-identical in ``b``
    (or missing from it, or of another shape)."""
    out = []
    for n in (names if names is not None else a):
        if n not in b or a[n].shape != b[n].shape:
            out.append(n)
        elif not torch.equal(a[n].detach().cpu(), b[n].detach().cpu().to(a[n].dtype)):
            out.append(n)
    return out
