"""One-pass (primal, tangent) engine for the first-order Taylor model of a network tail.

``torch.func.jvp`` computes f(x; theta0) and J (theta - theta0) with forward-mode AD. This engine
computes the same pair by hand, module by module (rules in :mod:`linft.core.tangent_rules`):

  - the primal stream at theta0 runs under ``torch.no_grad`` (it does not depend on theta);
  - a convolution's tangent is conv(dh, W0) + conv(h0, dW); a zero dh (the tail's first conv reads
    a constant trunk feature) costs nothing; eval-mode BatchNorm, ReLU/ReLU6, dropout (one mask for
    both streams, drawn with ``F.dropout`` so that seeds reproduce the jvp reference) and pooling
    use their exact derivatives; unknown modules fall back to ``torch.func.jvp`` for that submodule;
  - backward runs through the tangent stream only.

Cost (paper_notes.md, section 1): primal 1 + tangent 2 + backward 2 = 5 units against
3 for a standard step. For cached, un-augmented inputs the primal never changes (BatchNorm is
frozen, dropout sits after pooling): :class:`PrimalCache` stores, once, what the tangent needs
(each linearized conv's input, each BatchNorm's normalised input xhat, each ReLU's mask as bool,
the head's pooled input) and a step then costs ~4 units.

API:
  ``onepass_terms(module, x, params0, deltas)`` -> (f(x; theta0), J (theta - theta0))
  ``build_primal_cache(lin, inputs, store_dtype=None, batch_size=256)`` -> :class:`PrimalCache`
  ``PrimalCache.taylor_terms(idx)`` / ``PrimalCache(idx)`` for the examples ``inputs[idx]``.
``LinearizedModule(..., engine="onepass")`` uses ``onepass_terms`` for its forward.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from linft.core.tangent_rules import rule_for
from linft.errors import LinearizationError

_INPUT = "input"  # a cache entry that is the cached input tensor itself (stored once, by reference)


class _Shape(tuple):
    """A cache entry holding a layer's output shape without the batch dimension (see ``_Ctx.out_shape``)."""


class _Ctx:
    """Carries theta0 / theta - theta0 and the primal-cache mode through one pass.

    mode "compute": every primal is computed live; "record": primals are stored in ``entries``
    (no tangents); "replay": primals not computed live are read from ``cache`` at ``idx``.
    """

    def __init__(self, params0, deltas, mode="compute", x=None, cache=None, idx=None, root=None):
        self.params0, self.deltas, self.mode = params0, deltas, mode
        # the module the pass runs: a parameter reached under a second path (a module used twice,
        # tied weights) is found by identity under its first name, the one params0 uses
        self.root, self._names = root, None
        self.x, self.cache, self.idx = x, cache, idx
        self.entries: list = []
        self.pos = 0
        # the (primal, tangent) a convolution rule just created: the next rule may overwrite them in
        # place (a convolution's output feeds only the module after it in every container rule)
        self.fresh: tuple = (None, None)
        self.incoming: tuple = (None, None)

    @property
    def recording(self) -> bool:
        return self.mode == "record"

    def _key(self, m: nn.Module, prefix: str, name: str) -> str | None:
        """The params0 name of ``m``'s parameter ``name`` reached at ``prefix``, or None (frozen/absent).

        ``prefix + name`` is that name unless the parameter was reached under a second path (a
        module used twice, weights tied between modules): ``named_parameters()`` (and so params0)
        names each parameter once, under its first path, and reading the second path as a constant
        would use theta instead of theta0 and drop its tangent."""
        full = prefix + name
        if full in self.params0:
            return full
        try:
            p = m.get_parameter(name)
        except AttributeError:
            return None
        if self._names is None:
            self._names = {} if self.root is None else {id(q): n for n, q in self.root.named_parameters()}
        key = self._names.get(id(p))
        return key if key in self.params0 else None

    def linearized(self, m: nn.Module, prefix: str, name: str) -> bool:
        """Whether the parameter is linearized (static: the same when recording and replaying)."""
        return self._key(m, prefix, name) is not None

    def param(self, m: nn.Module, prefix: str, name: str):
        key = self._key(m, prefix, name)
        if key is not None:
            return self.params0[key], (None if self.recording else self.deltas.get(key))
        try:
            return m.get_parameter(name), None
        except AttributeError:
            return getattr(m, name, None), None

    def out_shape(self, live: bool, fn) -> tuple:
        """The full output shape of a layer whose tangent may be its bias alone (the tangent must have
        the full shape, see ``_full`` in the rules); replayed from the cache when not live. Rules call
        it whenever the bias is linearized and the weight is not (static, like ``need``)."""
        if self.mode == "compute":
            return tuple(fn())
        if self.mode == "record":
            s = tuple(fn())
            self.entries.append(_Shape(s[1:]))
            return s
        entry = self.cache._entry(self.pos)
        self.pos += 1
        if not isinstance(entry, _Shape):
            raise LinearizationError("the primal cache does not match the module (a shape was expected)")
        return tuple(fn()) if live else (self.cache._batch(self.idx),) + tuple(entry)

    def need(self, live: bool, fn, used: bool = True):
        if self.mode == "compute":
            return fn() if used else None
        if self.mode == "record":
            v = fn() if used else None
            self.entries.append(_INPUT if v is not None and v is self.x else v)
            return v
        entry = self.cache._entry(self.pos)
        self.pos += 1
        if isinstance(entry, _Shape):
            raise LinearizationError("the primal cache does not match the module (a shape where a value was expected)")
        if live:
            return fn() if used else None
        if entry is None:
            if used:
                raise LinearizationError("the primal cache lacks a value the tangent needs "
                                         "(was the module changed after the cache was built?)")
            return None
        return self.cache._gather(entry, self.idx)


def _check_params(params0: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]) -> None:
    extra = sorted(set(deltas) - set(params0))
    if extra:
        raise LinearizationError(f"deltas given for parameters without theta0: {extra[:3]}")


def onepass_terms(module: nn.Module, x: torch.Tensor, params0: Mapping[str, torch.Tensor],
                  deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x; theta0), J_theta f(x; theta0) (theta - theta0))`` for ``module`` on input ``x``.

    ``params0`` maps the linearized parameters' names (as in ``module.named_parameters()``) to theta0;
    ``deltas`` maps them to theta - theta0 (differentiable). Other parameters and all buffers are read
    from ``module`` as constants. BatchNorm must be in eval mode (frozen running statistics); dropout
    follows each module's ``training`` flag. The tangent is differentiable w.r.t. ``deltas``; the
    primal carries no graph.
    """
    _check_params(params0, deltas)
    ctx = _Ctx(params0, deltas, x=x, root=module)  # x: the caller's tensor, never modified in place
    y0, dy = rule_for(module)(module, "", x, None, ctx)
    return y0, (torch.zeros_like(y0) if dy is None else dy)


def _set_training(module: nn.Module, flags: list[bool] | None) -> list[bool]:
    mods = list(module.modules())
    old = [m.training for m in mods]
    for m, f in zip(mods, flags if flags is not None else [False] * len(mods)):
        m.training = f
    return old


class PrimalCache:
    """The primal activations at theta0 that the tangent stream needs, for fixed inputs [N, ...].

    Built once by :func:`build_primal_cache`; ``taylor_terms(idx)`` then runs the tangent stream of
    ``lin`` for the examples ``inputs[idx]`` without recomputing the primal. theta0 and the frozen
    BatchNorm statistics must not change afterwards (the cache would be stale). Dropout masks are
    drawn per call (the cached head input is the pooled representation before dropout).
    Memory: :attr:`nbytes` (the inputs, referenced not copied, excluded), :attr:`bytes_per_example`.
    """

    def __init__(self, lin, inputs: torch.Tensor, entries: list, store_dtype: torch.dtype | None):
        self.lin, self.inputs, self.entries, self.store_dtype = lin, inputs, entries, store_dtype
        self.compute_dtype = next(iter(lin.theta0.as_dict().values())).dtype

    @property
    def num_examples(self) -> int:
        return self.inputs.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(e.numel() * e.element_size() for e in self.entries if isinstance(e, torch.Tensor))

    @property
    def bytes_per_example(self) -> float:
        return self.nbytes / max(self.num_examples, 1)

    def _entry(self, pos: int):
        if pos >= len(self.entries):
            raise LinearizationError("the primal cache does not match the module (more values asked than stored)")
        return self.entries[pos]

    def _batch(self, idx) -> int:
        """How many examples ``inputs[idx]`` holds (without gathering them)."""
        if isinstance(idx, slice):
            return len(range(*idx.indices(self.num_examples)))
        if isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.dtype != torch.bool:
            return idx.shape[0]
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu()
        return torch.empty((self.num_examples, 0))[idx].shape[0]

    def _gather(self, entry, idx):
        src = self.inputs if isinstance(entry, str) else entry
        v = src[idx.to(src.device) if isinstance(idx, torch.Tensor) else idx]  # keeps channels_last
        if v.dtype != torch.bool and v.dtype != self.compute_dtype:
            v = v.to(self.compute_dtype)
        return v

    def taylor_terms(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x; theta0), J (theta - theta0))`` for ``x = inputs[idx]`` (idx: index tensor or slice)."""
        lin = self.lin
        lin._check_batchnorm()
        params0, deltas = lin.theta0.as_dict(), lin.lazy_delta()
        ctx = _Ctx(params0, deltas, mode="replay", cache=self, idx=idx, root=lin._shell)
        y0, dy = rule_for(lin._shell)(lin._shell, "", None, None, ctx)
        f0 = ctx.need(y0 is not None, lambda: y0)  # the cached output when nothing downstream is stochastic
        if ctx.pos != len(self.entries):
            raise LinearizationError("the primal cache does not match the module (fewer values asked than stored)")
        return f0, (torch.zeros_like(f0) if dy is None else dy)

    def __call__(self, idx) -> torch.Tensor:
        f0, df = self.taylor_terms(idx)
        return f0 + df


def _alloc(e, n: int, store_dtype: torch.dtype | None):
    """Room for ``n`` examples shaped like the recorded chunk ``e`` (same memory format)."""
    if not isinstance(e, torch.Tensor):  # None, _INPUT, a _Shape
        return e
    dtype = e.dtype if (e.dtype == torch.bool or store_dtype is None) else store_dtype
    out = torch.empty((n,) + tuple(e.shape[1:]), device=e.device, dtype=dtype)
    if e.dim() == 4 and not e.is_contiguous() and e.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.no_grad()
def build_primal_cache(lin, inputs: torch.Tensor, store_dtype: torch.dtype | None = None,
                       batch_size: int = 256, max_bytes: float | None = None) -> PrimalCache:
    """Run the primal stream of the LinearizedModule ``lin`` at theta0 over ``inputs`` [N, ...] once
    (in chunks of ``batch_size``, dropout off) and keep what its tangent stream needs.

    ``store_dtype`` (e.g. ``torch.float16``) stores the cached floats at lower precision (masks are
    bool; the inputs are referenced, never copied or rounded); they are cast back per step.
    ``max_bytes``: refuse (LinearizationError, before allocating) a cache that would be larger.
    """
    lin._check_batchnorm()
    shell, params0 = lin._shell, lin.theta0.as_dict()
    flags = _set_training(shell, None)
    try:
        store: list | None = None
        n = inputs.shape[0]
        for start in range(0, n, batch_size):
            x = inputs[start:start + batch_size]
            ctx = _Ctx(params0, {}, mode="record", x=x, root=shell)
            y0, _ = rule_for(shell)(shell, "", x, None, ctx)
            ctx.need(True, lambda: y0)
            if store is None:
                need = n * sum(_alloc(e, 1, store_dtype).nbytes for e in ctx.entries if isinstance(e, torch.Tensor))
                if max_bytes is not None and need > max_bytes:
                    raise LinearizationError(
                        f"the primal cache needs {need / 2**30:.2f} GiB for {n} examples "
                        f"({need / n / 2**20:.2f} MiB each), more than the {max_bytes / 2**30:.2f} GiB allowed")
                store = [_alloc(e, n, store_dtype) for e in ctx.entries]
            for s, e in zip(store, ctx.entries):
                if isinstance(s, torch.Tensor):
                    s[start:start + e.shape[0]] = e
    finally:
        _set_training(shell, flags)
    return PrimalCache(lin, inputs, store or [], store_dtype)
