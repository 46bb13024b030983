"""The empirical neural tangent kernel of a module in (a subset of) its parameters, and the kernel
distance of Fort et al. 2020.

For logits f(x; theta) in R^C and per-example Jacobians J_i = d f(x_i) / d theta in R^{C x P}:

  - full NTK  K[i, c, j, d] = <J_i[c], J_j[d]>                 ([N, C, N, C], or [N*C, N*C] flattened);
  - trace NTK K[i, j]       = sum_c <J_i[c], J_j[c]> = tr(J_i J_j^T)   ([N, N]).

Two algorithms (the torch.func NTK tutorial's), both chunked over examples so that at most
``2 * chunk * C * P`` numbers are alive at once (``chunk`` from ``memory_bytes``):
  - ``"jacobian"`` (Jacobian contraction): per-example Jacobians by ``vmap(jacrev)``, then an einsum;
  - ``"ntvp"`` (NTK-vector products): vjp for every output of chunk b, then jvp through chunk a.
When every Jacobian fits at once, each is computed once; otherwise the block (a, b), a <= b, is
computed from the Jacobians of chunks a and b (chunk b's recomputed per block).

``fn(params, x)`` must be a batched function whose examples do not interact (eval-mode BatchNorm,
dropout off): e.g. ``lambda p, x: functional_call(module, {**fixed, **p}, (x,))``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch.func import jacrev, jvp, vjp, vmap

FORMS = ("trace", "full")
METHODS = ("auto", "jacobian", "ntvp")


def _flat_jacobian(jac: Mapping[str, torch.Tensor], lead: int) -> torch.Tensor:
    return torch.cat([j.reshape(*j.shape[:lead], -1) for j in jac.values()], dim=-1)


def per_example_jacobian(fn: Callable, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[n, C, P]``: d fn(params, x_i)[c] / d params, flattened in ``params``' order."""
    def one(p, xi):
        return fn(p, xi.unsqueeze(0)).squeeze(0)
    jac = vmap(jacrev(one), in_dims=(None, 0))(dict(params), x)
    return _flat_jacobian(jac, 2)


def _contract(ja: torch.Tensor, jb: torch.Tensor, form: str) -> torch.Tensor:
    if form == "trace":
        return torch.einsum("icp,jcp->ij", ja, jb)
    return torch.einsum("icp,jdp->icjd", ja, jb)


def _ntvp_block(fn: Callable, params: dict, xa: torch.Tensor, xb: torch.Tensor, form: str) -> torch.Tensor:
    out_b, pull = vjp(lambda p: fn(p, xb), params)
    nb, c = out_b.shape
    basis = torch.eye(nb * c, dtype=out_b.dtype, device=out_b.device).view(nb * c, nb, c)
    cotangents = vmap(pull)(basis)[0]  # name -> [nb*C, *shape]: J_b[j, d] as parameter tensors

    def push(v):
        return jvp(lambda p: fn(p, xa), (params,), (v,))[1]
    k = vmap(push)(cotangents)  # [nb*C, na, C]: K[i, c, j, d] at [(j, d), i, c]
    k = k.view(nb, c, xa.shape[0], c).permute(2, 3, 0, 1)  # [na, C, nb, C]
    return torch.diagonal(k, dim1=1, dim2=3).sum(-1) if form == "trace" else k


def chunk_size(n_params: int, n_outputs: int, itemsize: int, memory_bytes: float) -> int:
    """Examples per chunk so that two chunks' Jacobians fit in ``memory_bytes``."""
    return max(1, int(memory_bytes // (2 * n_outputs * n_params * itemsize)))


def empirical_ntk(fn: Callable, params: Mapping[str, torch.Tensor], x: torch.Tensor, form: str = "trace",
                  method: str = "auto", chunk: int | None = None, memory_bytes: float = 2 * 2**30) -> torch.Tensor:
    """The empirical NTK of ``fn`` at ``params`` on the examples ``x`` (module docstring).

    Returns ``[N, N]`` (``form="trace"``) or ``[N, C, N, C]`` (``form="full"``), in ``params``'
    dtype. ``params`` are not modified (they are detached and re-tracked by torch.func).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = {n: p.detach() for n, p in params.items()}
    n = x.shape[0]
    with torch.no_grad():
        c = fn(params, x[:1]).shape[-1]
    n_params = sum(p.numel() for p in params.values())
    itemsize = next(iter(params.values())).element_size()
    chunk = chunk or chunk_size(n_params, c, itemsize, memory_bytes)
    starts = list(range(0, n, chunk))
    dtype, device = next(iter(params.values())).dtype, x.device
    k = torch.zeros((n, n) if form == "trace" else (n, c, n, c), dtype=dtype, device=device)
    use_jac = method != "ntvp"
    if use_jac and len(starts) == 1:
        j = per_example_jacobian(fn, params, x)
        return _contract(j, j, form)
    for ia, a in enumerate(starts):
        xa = x[a:a + chunk]
        ja = per_example_jacobian(fn, params, xa) if use_jac else None
        for b in starts[ia:]:
            xb = x[b:b + chunk]
            if use_jac:
                jb = ja if b == a else per_example_jacobian(fn, params, xb)
                blk = _contract(ja, jb, form)
            else:
                blk = _ntvp_block(fn, params, xa, xb, form)
            sa, sb = slice(a, a + xa.shape[0]), slice(b, b + xb.shape[0])
            if form == "trace":
                k[sa, sb] = blk
                k[sb, sa] = blk.T
            else:
                k[sa, :, sb, :] = blk
                k[sb, :, sa, :] = blk.permute(2, 3, 0, 1)
    return k


def kernel_distance(k0: torch.Tensor, k1: torch.Tensor) -> float:
    """``1 - <K0, K1>_F / (|K0|_F |K1|_F)`` (Fort et al. 2020), in float64; 0 for proportional kernels."""
    a, b = k0.detach().double().reshape(-1), k1.detach().double().reshape(-1)
    den = float(a.norm() * b.norm())
    if den == 0:
        return float("nan")
    return 1.0 - float(a @ b) / den


def label_alignment(k: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Centered kernel-target alignment of a trace NTK ``[N, N]`` with the one-hot labels:
    <K_c, Y_c Y_c^T>_F / (|K_c|_F |Y_c Y_c^T|_F), K_c = H K H, H the centering matrix."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    kc = h @ k.detach().double().cpu() @ h
    y = torch.nn.functional.one_hot(labels.cpu().long(), num_classes).double()
    yc = h @ y
    t = yc @ yc.T
    den = float(kc.norm() * t.norm())
    return float((kc * t).sum()) / den if den > 0 else float("nan")


def trace_form(k_full: torch.Tensor) -> torch.Tensor:
    """``[N, C, N, C] -> [N, N]``: sum over the output index."""
    return torch.diagonal(k_full, dim1=1, dim2=3).sum(-1)


def frobenius(k: torch.Tensor) -> float:
    return math.sqrt(float((k.detach().double() ** 2).sum()))
