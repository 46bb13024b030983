"""The fused convolution tangent of the one-pass engine (:mod:`linft.core.tangent_rules`):
``conv(dx, W0) + conv(h, dW)`` as ONE autograd node that saves only the primal input ``h`` and
``W0`` (autograd's own conv nodes would keep every tangent activation and every theta - theta0).
Inside torch.func transforms or forward-mode AD the plain convolutions are used instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _add(a, b):
    """Sum of two tangents where ``None`` is zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _same_pad(x: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """timm's TF 'SAME' padding (Conv2dSame), applied to primal and tangent alike (it is linear)."""
    ih, iw = x.shape[-2:]
    (kh, kw), (sh, sw), (dh, dw) = m.weight.shape[-2:], m.stride, m.dilation
    ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
    pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if ph or pw else x


class _ConvTangent(torch.autograd.Function):
    """conv(dx, W0) + conv(h, dW) in one autograd node that saves only h (and W0, a buffer).

    Autograd's own convolution node saves its input and weight whatever needs a gradient, so the
    unfused form would also keep every tangent activation dx and every dW = theta - theta0 alive
    until the backward (~1.4x a standard step's saved activations on a ResNet50 tail). Here
    grad_dx = conv_transpose(g, W0) and grad_dW = corr(h, g) come from one
    ``aten.convolution_backward`` call (h has dx's shape, so it stands in for the input size).
    Operands arrive already cast to the autocast dtype (see ``_conv_tangent``).
    """

    @staticmethod
    def forward(ctx, dx, h, w0, dw, conf):
        stride, padding, dilation, groups = conf
        with torch.autocast(w0.device.type, enabled=False):
            out = None if dx is None else F.conv2d(dx, w0, None, stride, padding, dilation, groups)
            if dw is not None:
                out2 = F.conv2d(h, dw, None, stride, padding, dilation, groups)
                out = out2 if out is None else out.add_(out2)
        ctx.conf, ctx.has_dw = conf, dw is not None
        # grad_dx needs only dx's size: an expanded scalar stands in when h is not kept (frozen W)
        ctx.save_for_backward(w0.new_zeros(()).expand(dx.shape) if h is None else h, w0)
        return out

    @staticmethod
    def backward(ctx, g):
        stride, padding, dilation, groups = ctx.conf
        h, w0 = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g.to(w0.dtype), h, w0, None, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups,
            [need_dx, need_dw and ctx.has_dw, False])
        return gx, None, None, gw, None


def _in_transform(*ts) -> bool:
    """Inside torch.func transforms (vmap, grad, jacrev, jvp) or forward-mode AD, where the fused
    node (reverse mode only) does not apply; the plain convolutions are used there instead."""
    return (torch.autograd.forward_ad._current_level >= 0
            or any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ts))


def _conv_tangent(dx, h, w0, dw, conf):
    """conv(dx, W0) + conv(h, dW); ``None`` operands are zero (dx) or not linearized (dW)."""
    stride, padding, dilation, groups = conf
    if isinstance(padding, str) or _in_transform(dx, h, w0, dw):  # padding="same"/"valid": plain too
        out = None if dx is None else F.conv2d(dx, w0, None, stride, padding, dilation, groups)
        return out if dw is None else _add(out, F.conv2d(h, dw, None, stride, padding, dilation, groups))
    dtype = _autocast_dtype(w0.device.type)
    if dtype is not None:  # what autocast would do to each convolution's operands
        dx, h, w0, dw = (None if t is None else t.to(dtype) for t in (dx, h, w0, dw))
    return _ConvTangent.apply(dx, h, w0, dw, conf)


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _autocast_dtype(device_type: str):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
