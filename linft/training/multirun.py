"""Many fine-tuning runs in one pass: K tails (+ DropoutHead) trained by one vectorised step.

The K members share the architecture and the pre-trained tail (theta0) and differ in seed (head
init, dropout masks, data order), dropout rate p, learning rate and weight decay. Their parameters
are stacked (``torch.func.stack_module_state``); one step evaluates all members with
``torch.func.vmap`` over ``functional_call`` and updates the stacked tensors with SGD (momentum,
weight decay, per-member lr, MultiStepLR-style decay), exactly the update ``torch.optim.SGD``
makes member by member.

Dropout masks are drawn outside ``vmap``, member by member, from each member's own generator
(seeded by (seed, "dropout")), and passed in: member k's masks do not depend on K or on the other
members, so a vectorised run equals K separate runs fed the same batches and masks
(tests/test_throughput_multirun.py). Frozen BatchNorm statistics (eval mode) are shared constants.

``linearized=True`` trains the first-order Taylor models instead (the paper's linearized tail):
    f_lin = W0 (m * (Phi0 + J_Phi dtheta_tail)) + dW (m * Phi0) + b0 + db
with ``torch.func.jvp`` of the pooled tail output under ``vmap`` (the same function as
:class:`linft.core.linearize.LinearizedModule` with a DropoutHead; weight decay acts on theta).

API::

    members = [Member(seed=0, p=0.5, lr=1e-3), Member(seed=1, p=0.9, lr=3e-3)]
    mr = MultiRun(tail, in_features=2048, num_classes=7, members=members)
    losses = mr.step(x, y)          # x [B, ...] shared, or [K, B, ...] per member; y alike
    mr.state_dict_of(k)             # member k as a Sequential(tail, head) state dict
"""
from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp, stack_module_state, vmap

from linft.core.heads import DropoutHead, check_dropout_rate, pool
from linft.core.heads import dropout_mask as core_dropout_mask
from linft.core.surgery import freeze_batchnorm
from linft.data.splits import derive_seed
from linft.errors import ConfigError


@dataclass(frozen=True)
class Member:
    """One run's hyper-parameters (the rest is shared)."""

    seed: int = 0
    p: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0


class TailHead(nn.Module):
    """``Sequential(tail, head)`` with an explicit dropout mask: ``fc(mask * pool(tail(x)))``."""

    def __init__(self, tail: nn.Module, head: DropoutHead):
        super().__init__()
        self.tail, self.head = tail, head

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        phi = pool(self.tail(x))
        return self.head.fc(phi if mask is None else phi * mask)


def make_member_module(tail: nn.Module, in_features: int, num_classes: int, member: Member) -> TailHead:
    """Member k's model: a copy of ``tail`` (BatchNorm frozen) and a DropoutHead initialised from
    ``derive_seed("head", seed)`` (so a sequential run builds the identical model)."""
    check_dropout_rate(member.p)
    t = freeze_batchnorm(copy.deepcopy(tail))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("head", member.seed))
        head = DropoutHead(in_features, num_classes, member.p)
    ref = next(iter(tail.parameters()))
    return TailHead(t, head.to(ref.device, ref.dtype))


def dropout_mask(gen: torch.Generator, p: float, shape, device, dtype) -> torch.Tensor:
    """Inverted-dropout mask m / (1 - p) (m ~ Bernoulli(1 - p)) drawn from ``gen``
    (:func:`linft.core.heads.dropout_mask`, the one implementation)."""
    return core_dropout_mask(shape, p, dtype=dtype, device=device, generator=gen)


class MultiRun:
    """K members trained in one vectorised step (see the module docstring).

    ``momentum``, ``head_lr_mult`` (lr multiplier of the head, the trainer's last_layer_lr_mult),
    ``lr_decay_steps``/``lr_decay`` (MultiStepLR) are shared; lr, weight decay, p, seed per member.
    """

    def __init__(self, tail: nn.Module, in_features: int, num_classes: int, members: list[Member], *,
                 momentum: float = 0.9, head_lr_mult: float = 1.0, lr_decay_steps=(), lr_decay: float = 0.1,
                 linearized: bool = False):
        if not members:
            raise ConfigError("MultiRun needs at least one member")
        self.members, self.K, self.linearized = list(members), len(members), linearized
        mods = [make_member_module(tail, in_features, num_classes, m) for m in members]
        self.template = copy.deepcopy(mods[0]).to("meta")
        params, _ = stack_module_state(mods)
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        self.theta0, theta0_dims = None, 0
        if linearized:  # the tail's theta0 is the same pre-trained tail for all: held (and its primal
            # stream computed, under vmap, when x is shared) once instead of K times
            theta0_dims = {n: (None if n.startswith("tail.") else 0) for n in params}
            self.theta0 = {n: (p[0] if theta0_dims[n] is None else p).detach().clone() for n, p in params.items()}
        self.buffers = {n: b for n, b in mods[0].named_buffers()}  # frozen BN stats: shared constants
        ref = next(iter(self.params.values()))
        self.device, self.dtype = ref.device, ref.dtype
        self.lr = torch.tensor([m.lr for m in members], device=self.device, dtype=self.dtype)
        self.wd = torch.tensor([m.weight_decay for m in members], device=self.device, dtype=self.dtype)
        self._any_wd = any(m.weight_decay != 0 for m in members)
        self.mult = {n: (head_lr_mult if n.startswith("head.") else 1.0) for n in self.params}
        self.momentum, self.milestones, self.gamma = momentum, sorted(lr_decay_steps), lr_decay
        self.bufs: dict[str, torch.Tensor] = {}
        self.steps_done = 0
        self.gens = [torch.Generator(self.device).manual_seed(derive_seed("dropout", m.seed)) for m in members]
        self._vf = vmap(self._lin_member if linearized else self._member, in_dims=(0, theta0_dims, 0, 0),
                        randomness="error")
        self._vf_shared = vmap(self._lin_member if linearized else self._member,
                               in_dims=(0, theta0_dims, None, 0), randomness="error")

    # -- the per-member function (vmapped) --------------------------------------------------------
    def _member(self, params, theta0, x, mask):
        return functional_call(self.template, {**self.buffers, **params}, (x, mask))

    def _lin_member(self, params, theta0, x, mask):
        tail_keys = [n for n in params if n.startswith("tail.")]
        consts = {n[5:]: b for n, b in self.buffers.items() if n.startswith("tail.")}

        def phi(tp):
            return pool(functional_call(self.template.tail, {**consts, **tp}, (x,)))

        phi0, dphi = jvp(phi, ({n[5:]: theta0[n] for n in tail_keys},),
                         ({n[5:]: params[n] - theta0[n] for n in tail_keys},))
        w, b, w0 = params["head.fc.weight"], params["head.fc.bias"], theta0["head.fc.weight"]
        return F.linear(mask * (phi0 + dphi), w0, b) + F.linear(mask * phi0, w - w0)

    # -- one step -----------------------------------------------------------------------------------
    def masks(self, batch: int) -> torch.Tensor:
        """This step's dropout masks [K, B, D], member k's from its own generator."""
        d = self.params["head.fc.weight"].shape[-1]
        return torch.stack([dropout_mask(g, m.p, (batch, d), self.device, self.dtype)
                            for g, m in zip(self.gens, self.members)])

    def logits(self, x: torch.Tensor, masks: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        """Logits [K, B, C] of every member (masks [K, B, D]; all ones for evaluation)."""
        f = self._vf if per_member else self._vf_shared
        return f(self.params, self.theta0 if self.linearized else self.params, x, masks)

    def current_lr(self) -> torch.Tensor:
        """Per-member lr of the next step (MultiStepLR: decayed at each milestone passed)."""
        return self.lr * self.gamma ** bisect.bisect_right(self.milestones, self.steps_done)

    def step(self, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor | None = None,
             per_member: bool | None = None) -> torch.Tensor:
        """One SGD step of every member on ``(x, y)``: shared ``x [B, ...]``, ``y [B]`` or per member
        ``x [K, B, ...]``, ``y [K, B]`` (``per_member`` says which when ambiguous; default: per member
        when ``y`` is 2-D). Returns the K losses (mean cross-entropy over the batch), detached."""
        per = (y.dim() == 2) if per_member is None else per_member
        B = y.shape[-1]
        masks = self.masks(B) if masks is None else masks
        out = self.logits(x, masks, per)  # [K, B, C]
        yy = y if per else y.expand(self.K, B)
        losses = F.cross_entropy(out.flatten(0, 1), yy.flatten(), reduction="none").view(self.K, B).mean(1)
        names = list(self.params)
        grads = torch.autograd.grad(losses.sum(), [self.params[n] for n in names])
        self._sgd(names, grads)
        return losses.detach()

    @torch.no_grad()
    def _sgd(self, names, grads) -> None:
        lr = self.current_lr()
        for n, g in zip(names, grads):
            p = self.params[n]
            shape = (self.K,) + (1,) * (p.dim() - 1)
            d = g + self.wd.view(shape) * p if self._any_wd else g
            if self.momentum:
                if n not in self.bufs:
                    self.bufs[n] = d.clone()
                else:
                    self.bufs[n].mul_(self.momentum).add_(d)
                d = self.bufs[n]
            p.sub_((lr * self.mult[n]).view(shape) * d)
        self.steps_done += 1

    # -- results ------------------------------------------------------------------------------------
    def state_dict_of(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's parameters and buffers (``TailHead`` names: ``tail.*``, ``head.fc.*``)."""
        out = {n: p[k].detach().clone() for n, p in self.params.items()}
        out.update({n: b.clone() for n, b in self.buffers.items()})
        return out


# -- the vmapped forward of any trainable module (the group trainer, linft.training.group) ----------
class _Masks:
    """The dropout masks of the member being traced (set inside the vmapped function)."""
    current: torch.Tensor | None = None


_ORIG_DROPOUT = F.dropout


def _masked_dropout(input, p=0.5, training=True, inplace=False):
    if not training or (_Masks.current is None and p == 0):
        return input
    if _Masks.current is None:
        raise ConfigError("a dropout without a member mask inside a vectorised step")
    return input * _Masks.current


def replay_dropout_mask(rng_state: torch.Tensor, p: float, shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled mask a single run's ``F.dropout(x, p, True)`` multiplies ``x`` [shape] by when the
    global RNG is at ``rng_state``, and the RNG state after the draw. The mask is drawn by ``F.dropout``
    itself, from the global generator set to the member's state (so the bits are the single run's)."""
    saved = torch.get_rng_state()
    try:
        torch.set_rng_state(rng_state)
        mask = _ORIG_DROPOUT(torch.ones(shape, dtype=dtype, device=device), p, True)
        return mask, torch.get_rng_state()
    finally:
        torch.set_rng_state(saved)


_ORIG_CONV2D = F.conv2d


def _two(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _vmap_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d`` inside the vectorised step: with member-batched weights, vmap turns every
    convolution into one grouped convolution (K groups), which CPU kernels run several times slower
    than K plain ones. Pointwise (1x1) convolutions are computed as a batched matmul and depthwise ones
    as a sum of shifted products instead (the same sums, in another order); others are unchanged."""
    if isinstance(padding, str) or input.dim() != 4:
        return _ORIG_CONV2D(input, weight, bias, stride, padding, dilation, groups)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = weight.shape[-2:], _two(stride), _two(padding), _two(dilation)
    if (kh, kw) == (1, 1) and groups == 1 and (ph, pw) == (0, 0):
        y = F.linear(input[:, :, ::sh, ::sw].permute(0, 2, 3, 1), weight.flatten(1), bias)
        return y.permute(0, 3, 1, 2)
    c = input.shape[1]
    if groups == c and weight.shape[0] == c and weight.shape[1] == 1:
        h, wd = input.shape[2], input.shape[3]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        same = ph == dh * (kh // 2) and pw == dw * (kw // 2) and kh % 2 and kw % 2
        if (h, wd) == (1, 1) and (ho, wo) == (1, 1) and same:
            # a 1x1 map, 'same' padding: only the centre tap reads the input
            centre = weight[:, 0, kh // 2, kw // 2].view(1, c, 1, 1)
            return input * centre if bias is None else input * centre + bias.view(1, c, 1, 1)
        x = F.pad(input, [pw, pw, ph, ph]) if ph or pw else input
        w = weight.flatten(1)  # [C, kh * kw]

        def real(first: int, step: int, n: int, pad: int, size: int) -> bool:  # reads more than padding
            return any(pad <= first + step * r < pad + size for r in range(n))
        out = None
        for i in range(kh):
            if not real(i * dh, sh, ho, ph, h):
                continue  # this tap multiplies zeros only (e.g. a 1x1 feature map): skipped
            for j in range(kw):
                if not real(j * dw, sw, wo, pw, wd):
                    continue
                tap = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                term = tap * w[:, i * kw + j].view(1, c, 1, 1)
                out = term if out is None else out + term
        return out if bias is None else out + bias.view(1, c, 1, 1)
    return _ORIG_CONV2D(input, weight, bias, stride, padding, dilation, groups)


class StackedForward:
    """``vmap`` of ``functional_call(template, ...)`` over K members of one architecture.

    ``params`` (trainable, stacked [K, ...]) are batched; the template's other tensors (buffers, frozen
    parameters, e.g. theta0 of a linearized tail or frozen BatchNorm statistics) are shared when every
    member holds the same values (then a computation that reads only shared tensors and a shared
    input, e.g. the primal stream of the linearized tail at theta0, runs once for all members), else
    stacked. Every ``F.dropout`` inside reads the member's mask (``masks`` [K, B, D]) instead of
    drawing: the masks are drawn outside, per member (:func:`replay_dropout_mask`)."""

    def __init__(self, members: list[nn.Module], trainable: list[str], any_dropout: bool):
        template = copy.deepcopy(members[0])
        self.template, self.names = template, list(trainable)
        others = {**dict(template.named_buffers()),
                  **{n: p for n, p in template.named_parameters() if n not in self.names}}
        self.consts, self.const_dims = {}, {}
        per = [{**dict(m.named_buffers()), **dict(m.named_parameters())} for m in members]
        for n in others:
            vals = [d[n].detach() for d in per]
            same = all(v.shape == vals[0].shape and torch.equal(v, vals[0]) for v in vals[1:])
            self.consts[n] = vals[0] if same else torch.stack(vals)
            self.const_dims[n] = None if same else 0
        for m in template.modules():  # a member with p > 0 must reach the dropout call (see _dropout_mask)
            if isinstance(m, DropoutHead) and any_dropout:
                m.p = 0.5

    def _one(self, params, consts, x, mask):
        prev, _Masks.current = _Masks.current, mask
        try:
            return functional_call(self.template, {**consts, **params}, (x,))
        finally:
            _Masks.current = prev

    def __call__(self, params: dict, x: torch.Tensor, x_batched: bool,
                 masks: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [K, B, C] of every member; ``x`` [B, ...] shared or [K, B, ...] per member
        (``x_batched``); ``masks`` [K, B, D] or None (evaluation, or no member with p > 0)."""
        f = vmap(self._one, in_dims=(0, self.const_dims, 0 if x_batched else None, None if masks is None else 0),
                 randomness="error")
        F.dropout, F.conv2d = _masked_dropout, _vmap_conv2d
        try:
            return f(params, self.consts, x, masks)
        finally:
            F.dropout, F.conv2d = _ORIG_DROPOUT, _ORIG_CONV2D
