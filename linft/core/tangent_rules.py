"""Per-module rules of the one-pass (primal, tangent) engine (see :mod:`linft.core.tangent`).

A rule is ``rule(m, prefix, x0, dx, ctx) -> (y0, dy)``:
  - ``x0`` the primal input at theta0, or ``None`` when it is not computed (the primal cache
    replays what the tangent needs instead); ``y0`` follows the same convention;
  - ``dx`` the tangent input (a function of theta - theta0, differentiable), ``None`` for a zero tangent;
  - ``ctx.param(m, prefix, name)`` -> ``(p0, dp)``: the parameter at theta0 and theta - theta0 (``None``
    when the parameter is not linearized);
  - ``ctx.need(live, fn, used)`` -> a primal tensor the tangent needs: ``fn()`` evaluated on live
    primals, or the cached value when ``live`` is False. Every rule calls ``need`` in the same order
    whatever the mode, so that recorded and replayed entries line up.
Primal values are computed under ``torch.no_grad`` (they do not depend on theta).

Modules are recognised by exact type (torch) or by class name and attributes (torchvision, timm),
without importing torchvision or timm. Anything else falls back to ``torch.func.jvp``.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp

from linft.core.conv_tangent import _ConvTangent, _add, _conv_tangent, _in_transform, _same_pad  # noqa: F401 (_ConvTangent: tests)
from linft.core.heads import DropoutHead, dropout_mask, pool
from linft.errors import LinearizationError


def _chan(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector [C] shaped to broadcast over [B, C, ...]."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _full(v: torch.Tensor, shape, like=None) -> torch.Tensor:
    """``v`` (a bias, broadcastable) as a full tangent of ``shape``, in ``like``'s memory format.

    A layer whose only linearized term is its bias must not hand on a broadcast [1, C, 1, 1] / [C]
    tangent: a padded convolution of a constant is not constant at the borders, and the in-place
    rules (BatchNorm, ReLU) need a full-shape tensor of their own."""
    cl = (like is not None and like.dim() == 4 and not like.is_contiguous()
          and like.is_contiguous(memory_format=torch.channels_last))
    return v.expand(shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _run(m: nn.Module, prefix: str, x0, dx, ctx):
    # what the previous rule marked fresh is visible to this rule only (ctx.incoming)
    ctx.incoming, ctx.fresh = ctx.fresh, (None, None)
    return rule_for(m)(m, prefix, x0, dx, ctx)


# ---- convolution / linear ------------------------------------------------------------------

def _affine_primal(m, prefix, x0, ctx, forward):
    """The primal side of a conv or linear layer: ``(h, y0, shape)`` = the input its weight tangent
    needs (recorded or replayed), the output at theta0 (None when not live) and, when the tangent may
    be the bias alone, the full output shape that tangent must take."""
    live = x0 is not None
    lin_w = ctx.linearized(m, prefix, "weight")
    h = ctx.need(live, lambda: x0, used=lin_w)
    y0 = None
    if live:
        with torch.no_grad():
            y0 = forward()
    shape = None
    if not lin_w and ctx.linearized(m, prefix, "bias"):  # the tangent may be the bias alone
        shape = ctx.out_shape(live, lambda: y0.shape)
    return h, y0, shape


def _conv(m: nn.Conv2d, prefix, x0, dx, ctx):
    w0, dw = ctx.param(m, prefix, "weight")
    b0, db = ctx.param(m, prefix, "bias")
    same = type(m).__name__ == "Conv2dSame"
    if same or m.padding_mode != "zeros":
        pad = ((lambda t: _same_pad(t, m)) if same else
               (lambda t: F.pad(t, m._reversed_padding_repeated_twice, mode=m.padding_mode)))
        padding = 0
    else:
        pad, padding = (lambda t: t), m.padding

    h, y0, shape = _affine_primal(m, prefix, x0, ctx,
                                  lambda: F.conv2d(pad(x0), w0, b0, m.stride, padding, m.dilation, m.groups))
    dy = None
    if dx is not None or dw is not None:  # dh = 0 (a constant input) costs nothing
        dy = _conv_tangent(None if dx is None else pad(dx), None if h is None else pad(h), w0, dw,
                           (m.stride, padding, m.dilation, m.groups))
    if db is not None:
        dy = _full(_chan(db, 4), shape, y0) if dy is None else dy + _chan(db, 4)
    ctx.fresh = (y0, dy)
    return y0, dy


def _linear(m: nn.Linear, prefix, x0, dx, ctx):
    w0, dw = ctx.param(m, prefix, "weight")
    b0, db = ctx.param(m, prefix, "bias")
    h, y0, shape = _affine_primal(m, prefix, x0, ctx, lambda: F.linear(x0, w0, b0))
    dy = None if dx is None else F.linear(dx, w0)
    if dw is not None:
        dy = _add(dy, F.linear(h, dw))
    if db is not None:
        dy = _full(db, shape) if dy is None else dy + db
    return y0, dy


# ---- normalisation / activations -----------------------------------------------------------

def _batchnorm(m: nn.modules.batchnorm._BatchNorm, prefix, x0, dx, ctx):
    """Eval-mode BatchNorm with frozen running statistics: y = xhat * gamma + beta,
    dy = dx * gamma0 / sqrt(var + eps) + dgamma * xhat + dbeta."""
    if m.training or m.running_mean is None:
        raise LinearizationError(f"BatchNorm {prefix or type(m).__name__!r} must be in eval mode with running "
                                 "statistics (frozen BatchNorm) for the one-pass engine")
    g0, dg = ctx.param(m, prefix, "weight") if m.affine else (None, None)
    b0, db = ctx.param(m, prefix, "bias") if m.affine else (None, None)
    invstd = torch.rsqrt(m.running_var + m.eps)
    keep = ctx.linearized(m, prefix, "weight") or ctx.linearized(m, prefix, "bias")
    live = x0 is not None
    fresh0, fresh_t = ((t is not None and t is f) for t, f in zip((x0, dx), ctx.incoming))
    y0 = xhat = None
    if live:  # few activation-sized temporaries: the primal runs beside the tangent stream
        with torch.no_grad():
            mean = _chan(m.running_mean, x0.dim())
            xhat = (x0.sub_(mean) if fresh0 else torch.sub(x0, mean)).mul_(_chan(invstd, x0.dim()))
            if g0 is None:
                y0 = xhat
            elif keep:
                y0 = torch.addcmul(_chan(b0, x0.dim()), xhat, _chan(g0, x0.dim()))
            else:
                y0 = xhat.mul_(_chan(g0, x0.dim())).add_(_chan(b0, x0.dim()))
    xh = ctx.need(live, lambda: xhat, used=keep)
    dy = None
    if dx is not None:  # fused, so that each BN adds one tangent tensor, not four
        s0 = _chan(invstd if g0 is None else g0 * invstd, dx.dim())
        if fresh_t:  # autograd still checks: it refuses the in-place op if dx were saved
            dy = dx.mul_(s0) if db is None else dx.mul_(s0).add_(_chan(db, dx.dim()))
        else:
            dy = torch.addcmul(_chan(db, dx.dim()), dx, s0) if db is not None else dx * s0
        if dg is not None:  # in place: dy is this rule's own tensor and saved by nobody (autograd checks)
            dg = _chan(dg, xh.dim())
            dy = torch.addcmul(dy, xh, dg) if _in_transform(dy) else dy.addcmul_(xh, dg)
    else:
        if dg is not None:
            dy = xh * _chan(dg, xh.dim())
        if db is not None:
            dy = _chan(db, xh.dim()).expand_as(xh).clone() if dy is None else dy + _chan(db, xh.dim())
    return y0, dy


def _masked(fwd, mask_of):
    """An elementwise activation whose derivative is 0/1: dy = dx * mask(y0). In place on the primal
    when the module is declared ``inplace`` (the network itself then never reads its input again),
    except on the pass's own input (the caller's tensor, or a cached input)."""
    def rule(m, prefix, x0, dx, ctx):
        live = x0 is not None
        y0 = None
        inplace = getattr(m, "inplace", False)
        if live:
            with torch.no_grad():
                y0 = fwd(m, x0, inplace and x0 is not ctx.x)
        mask = ctx.need(live, lambda: mask_of(m, x0, y0), used=True)
        if dx is None:
            return y0, None
        return y0, (dx.mul_(mask) if inplace else dx * mask)  # autograd refuses it if dx were saved
    return rule


_relu = _masked(lambda m, x, inplace: F.relu(x, inplace), lambda m, x, y: y > 0)
_hardtanh = _masked(lambda m, x, inplace: F.hardtanh(x, m.min_val, m.max_val),  # the mask reads x
                    lambda m, x, y: (x > m.min_val) & (x < m.max_val))


def _dropout_mask(x0: torch.Tensor, p: float, training: bool):
    """The scaled mask F.dropout(x, p, training) multiplies x by, drawn with F.dropout itself so that
    the RNG is consumed exactly as in the reference (same shape, dtype and device)."""
    if not training or p == 0:
        return None
    return dropout_mask(x0.shape, p, dtype=x0.dtype, device=x0.device, memory_format=_layout(x0))


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _dropout(m, prefix, x0, dx, ctx, p=None):
    """One mask shared by the primal and the tangent stream (inverted scaling)."""
    p = m.p if p is None else p
    x0 = ctx.need(x0 is not None, lambda: x0, used=True)
    if ctx.recording:  # the cache records deterministic values only; no RNG is consumed
        return x0, dx
    noise = _dropout_mask(x0, p, m.training)
    if noise is None:
        return x0, dx
    with torch.no_grad():
        y0 = x0 * noise
    return y0, (None if dx is None else dx * noise)


def _linear_free(fn):
    """A parameter-free module linear in its input: the same map acts on primal and tangent."""
    def rule(m, prefix, x0, dx, ctx):
        y0 = None
        if x0 is not None:
            with torch.no_grad():
                y0 = fn(m, x0)
        return y0, (None if dx is None else fn(m, dx))
    return rule


_apply = _linear_free(lambda m, t: m(t))

# ---- containers and blocks -----------------------------------------------------------------


def _sequential(m, prefix, x0, dx, ctx):
    # every entry, as Sequential.forward runs them: named_children() would skip a module's second use
    for name, child in m._modules.items():
        x0, dx = _run(child, f"{prefix}{name}.", x0, dx, ctx)
    return x0, dx


def _chain(names):
    def run(m, prefix, x0, dx, ctx):
        for n in names:
            child = getattr(m, n, None)
            if child is not None:
                x0, dx = _run(child, f"{prefix}{n}.", x0, dx, ctx)
        return x0, dx
    return run


def _residual_sum(a0, da, b0, db, relu=None, prefix="", ctx=None, inplace=False):
    """``inplace``: ``a0`` is the block's own branch output (torchvision's ``out += identity``)."""
    y0 = None
    if a0 is not None and b0 is not None:
        with torch.no_grad():
            y0 = a0.add_(b0) if inplace else a0 + b0
    dy = da.add_(db) if inplace and da is not None and db is not None else _add(da, db)
    if relu is not None:
        y0, dy = _run(relu, prefix, y0, dy, ctx)
    return y0, dy


def _resnet_block(names):
    """torchvision BasicBlock / Bottleneck: relu(bn_k(conv_k(...relu(bn1(conv1(x)))...)) + shortcut)."""
    def rule(m, prefix, x0, dx, ctx):
        h0, dh = x0, dx
        for i, (c, b) in enumerate(names):
            h0, dh = _run(getattr(m, c), prefix + c + ".", h0, dh, ctx)
            h0, dh = _run(getattr(m, b), prefix + b + ".", h0, dh, ctx)
            if i < len(names) - 1:
                h0, dh = _run(m.relu, prefix + "relu.", h0, dh, ctx)
        s0, ds = x0, dx
        if m.downsample is not None:
            s0, ds = _run(m.downsample, prefix + "downsample.", x0, dx, ctx)
        return _residual_sum(h0, dh, s0, ds, m.relu, prefix + "relu.", ctx, inplace=True)
    return rule


def _timm_block(names):
    """timm InvertedResidual / DepthwiseSeparableConv: the chain, then drop_path(x) + x if has_skip."""
    chain = _chain(names)

    def rule(m, prefix, x0, dx, ctx):
        h0, dh = chain(m, prefix, x0, dx, ctx)
        if not m.has_skip:
            return h0, dh
        h0, dh = _run(m.drop_path, prefix + "drop_path.", h0, dh, ctx)
        return _residual_sum(h0, dh, x0, dx)
    return rule


def _batchnorm_act(m, prefix, x0, dx, ctx):
    """timm BatchNormAct2d: BatchNorm, then ``drop``, then ``act``."""
    x0, dx = _batchnorm(m, prefix, x0, dx, ctx)
    for n in ("drop", "act"):
        if hasattr(m, n):
            x0, dx = _run(getattr(m, n), f"{prefix}{n}.", x0, dx, ctx)
    return x0, dx


def _dropout_head(m: DropoutHead, prefix, x0, dx, ctx):
    """pool -> dropout(p) -> fc; linear in the tail's output and first order in (W, b)."""
    y0, dy = _linear_free(lambda _, t: pool(t))(m, prefix, x0, dx, ctx)
    y0, dy = _dropout(m, prefix, y0, dy, ctx, p=m.p)
    return _linear(m.fc, prefix + "fc.", y0, dy, ctx)


# ---- fallback: torch.func.jvp over functional_call for that submodule ----------------------

def shares_modules(module: nn.Module) -> bool:
    """Whether a submodule is reachable under two paths (a module used twice)."""
    return (sum(1 for _ in module.named_modules(remove_duplicate=False))
            != sum(1 for _ in module.named_modules()))


def functional_call_restoring(module: nn.Module, tensors, args, kwargs, shared: bool):
    """``torch.func.functional_call``; with a module used twice (``shared``) it computes the right
    values but restores the module wrongly (torch 2.x: both paths' parameters are left as plain
    tensors, so the module no longer holds its own trainable parameters), so every submodule's
    parameters and buffers are put back by hand afterwards."""
    if not shared:
        return functional_call(module, tensors, args, kwargs)
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return functional_call(module, tensors, args, kwargs)
    finally:
        for m, ps, bs in saved:
            m._parameters.update(ps)
            m._buffers.update(bs)



def _fallback(m, prefix, x0, dx, ctx):
    live = x0 is not None
    x = ctx.need(live, lambda: x0, used=True)
    names = [n for n, _ in m.named_parameters()]
    pairs = {n: ctx.param(m, prefix, n) for n in names}
    lin = {n: pd for n, pd in pairs.items() if pd[1] is not None}
    if ctx.recording or (not lin and dx is None):
        with torch.no_grad():
            y0 = functional_call_restoring(m, {n: pd[0] for n, pd in pairs.items()}, (x,), {}, shares_modules(m))
        return y0, None
    const = {n: pd[0] for n, pd in pairs.items() if pd[1] is None}
    p0 = {n: pd[0] for n, pd in lin.items()}
    dp = {n: pd[1] for n, pd in lin.items()}
    t = torch.zeros_like(x) if dx is None else dx
    shared = shares_modules(m)
    return jvp(lambda xx, pp: functional_call_restoring(m, {**const, **pp}, (xx,), {}, shared), (x, p0), (t, dp))


# ---- dispatch --------------------------------------------------------------------------------

_EXACT = {
    nn.Conv2d: _conv, nn.Linear: _linear, nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm,
    nn.ReLU: _relu, nn.ReLU6: _hardtanh, nn.Hardtanh: _hardtanh, nn.Dropout: _dropout,
    nn.Identity: _apply, nn.Flatten: _apply, nn.AdaptiveAvgPool2d: _apply, nn.AvgPool2d: _apply,
    nn.Sequential: _sequential, DropoutHead: _dropout_head,
}
# class name -> (attributes it must have, rule)
_BY_NAME = {
    "BasicBlock": (("conv1", "bn1", "conv2", "bn2", "relu", "downsample"),
                   _resnet_block((("conv1", "bn1"), ("conv2", "bn2")))),
    "Bottleneck": (("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"),
                   _resnet_block((("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")))),
    "InvertedResidual": (("conv_pw", "bn1", "conv_dw", "bn2", "se", "conv_pwl", "bn3", "has_skip", "drop_path"),
                         _timm_block(("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se",
                                      "conv_pwl", "bn3"))),
    "DepthwiseSeparableConv": (("conv_dw", "bn1", "se", "conv_pw", "bn2", "has_skip", "drop_path"),
                               _timm_block(("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"))),
    "BatchNormAct2d": (("act", "drop", "running_mean"), _batchnorm_act),
    "SelectAdaptivePool2d": (("pool", "flatten"), _chain(("pool", "flatten"))),
    "FastAdaptiveAvgPool": (("flatten",), _apply),
    "Conv2dSame": (("weight", "stride", "dilation", "groups"), _conv),
}


def rule_for(m: nn.Module):
    """The rule for ``m``: exact torch types, then known third-party classes, else the jvp fallback."""
    rule = _EXACT.get(type(m))
    if rule is not None:
        return rule
    known = _BY_NAME.get(type(m).__name__)
    if known is not None and all(hasattr(m, a) for a in known[0]):
        return known[1]
    return _fallback
