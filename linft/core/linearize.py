"""Exact first-order Taylor model of a module in its parameters (NTK-style linearization).

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

computed with ``torch.func.jvp`` over ``torch.func.functional_call``: one forward-mode pass gives
the primal f(x; theta0) and the tangent J (theta - theta0) together. Only parameters with
``requires_grad=True`` are linearized; the others (and all buffers) are constants.

BatchNorm policy ("frozen"): every BatchNorm uses the pre-trained running statistics and is never
updated. Train-mode BatchNorm would make f depend on the batch and update running statistics in
place, which breaks the Taylor model (and torch.func's jvp, pytorch#85533); BatchNorm without
running statistics is refused.

Dropout: a dropout module inside ``f`` draws one mask per example and applies it to the primal and
the tangent stream alike (forward-mode AD of dropout multiplies the tangent by the same mask). For
the paper's head, pool -> dropout -> Linear(W0, b0), the linearized output is therefore
    W0 (m * Phi_lin) + dW (m * Phi0) + b0 + db,   Phi_lin = Phi0 + J_Phi dtheta_tail,
first order in both the tail and the head ([ZB] Sec. 3, the linear view of fine-tuning).

Head initialisation matters: with a zero head (W0 = 0) the tail's tangent is multiplied by W0 and
receives no gradient, so a linearized tail never moves. Linearize around a random head (DomainBed's
default init, what :class:`~linft.core.heads.DropoutHead` does) or a linear-probe head (LP-FT).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.func import jvp
from torch.utils._pytree import tree_map

from linft.core.surgery import batchnorm_modules, freeze_batchnorm
from linft.core.tangent import onepass_terms
from linft.core.tangent_rules import functional_call_restoring as _functional_call, shares_modules
from linft.errors import LinearizationError

ENGINES = ("jvp", "onepass")
_SEP = ":"  # stands for "." in theta0's buffer names (buffer names cannot hold dots)


class _ParamStore(nn.Module):
    """theta0 as buffers (saved in state_dict, moved by .to(), never trained)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", _SEP), t.detach().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name.replace(_SEP, "."): b for name, b in self._buffers.items()}


class LazyDelta(Mapping):
    """``{name: theta[name] - theta0[name]}``, each difference computed (differentiably) when read."""

    def __init__(self, theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]):
        self._theta, self._theta0 = theta, theta0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._theta[name] - self._theta0[name]

    def __iter__(self):
        return iter(self._theta)

    def __len__(self) -> int:
        return len(self._theta)


class LinearizedModule(nn.Module):
    """A module with the wrapped module's call signature and parameter names whose output is the
    wrapped module's first-order Taylor expansion around ``theta0`` (see the module docstring).

    ``named_parameters()`` yields theta, named as in the wrapped module and initialised to theta0;
    ``theta0`` holds the expansion point (a child module of buffers, so it is saved and moved with
    the rest). The wrapped module is deep-copied, never mutated.
    """

    def __init__(self, module: nn.Module, params0: Mapping[str, torch.Tensor] | None = None,
                 engine: str = "jvp"):
        super().__init__()
        if engine not in ENGINES:
            raise LinearizationError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
        shell = copy.deepcopy(module)
        for name, m in batchnorm_modules(shell):
            if not m.track_running_stats or m.running_mean is None:
                raise LinearizationError(f"BatchNorm {name or type(m).__name__!r} has no running statistics; "
                                         "linft linearizes with frozen pre-trained statistics only")
        freeze_batchnorm(shell)
        names = {n for n, p in shell.named_parameters() if p.requires_grad}
        if not names:
            raise LinearizationError("the module has no trainable parameters to linearize")
        if params0 is not None:
            missing = sorted(names - set(params0))
            if missing:
                raise LinearizationError(f"params0 lacks {len(missing)} parameters, e.g. {missing[:3]}")
            with torch.no_grad():
                for n, p in shell.named_parameters():
                    if n in names:
                        p.copy_(params0[n])
        if "theta0" in dict(shell.named_children()):
            raise LinearizationError("cannot linearize a module with a child named 'theta0'")
        # The shell is the template functional_call runs; its children become ours so that our
        # parameters and buffers carry the wrapped module's names.
        object.__setattr__(self, "_shell", shell)
        self._shared = shares_modules(shell)
        for name, child in shell.named_children():
            self.add_module(name, child)
        for name, p in shell.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in shell.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self._linear_names = tuple(n for n, _ in shell.named_parameters() if n in names)
        self.theta0 = _ParamStore({n: p for n, p in shell.named_parameters() if n in names})

    # -- state ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LinearizedModule":
        super().train(mode)
        self._shell.train(mode)  # the shell's own flag (a top-level Dropout/head reads it)
        return self

    def theta(self) -> dict[str, torch.Tensor]:
        """Current parameters theta (trainable), by the wrapped module's names."""
        own = dict(self.named_parameters())
        return {n: own[n] for n in self._linear_names}

    def delta(self) -> dict[str, torch.Tensor]:
        """theta - theta0, by name (differentiable w.r.t. theta)."""
        t0 = self.theta0.as_dict()
        return {n: p - t0[n] for n, p in self.theta().items()}

    def lazy_delta(self) -> "LazyDelta":
        """theta - theta0 as a mapping that computes each entry when it is read (the one-pass engine
        reads each once, so no parameter-sized difference outlives the layer that uses it)."""
        return LazyDelta(self.theta(), self.theta0.as_dict())

    def _constants(self) -> dict[str, torch.Tensor]:
        consts = {n: b for n, b in self.named_buffers() if not n.startswith("theta0.")}
        consts.update({n: p for n, p in self.named_parameters() if n not in self._linear_names})
        return consts

    def _check_batchnorm(self) -> None:
        for name, m in batchnorm_modules(self._shell):
            if m.training:
                raise LinearizationError(
                    f"BatchNorm {name!r} is in train mode: the linearized model uses frozen pre-trained "
                    "statistics (train-mode BatchNorm updates them in place and breaks jvp)")

    # -- evaluation -------------------------------------------------------------------------
    def taylor_terms(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """``(f(x; theta0), J f(x; theta0) (theta - theta0))``, each shaped like f's output."""
        self._check_batchnorm()
        if self.engine == "onepass":
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                raise LinearizationError("engine='onepass' takes one tensor input; use engine='jvp'")
            return onepass_terms(self._shell, args[0], self.theta0.as_dict(), self.lazy_delta())
        consts = self._constants()
        theta0 = self.theta0.as_dict()

        def f(params: dict[str, torch.Tensor]):
            return _functional_call(self._shell, {**consts, **params}, args, kwargs, self._shared)

        return jvp(f, (theta0,), (self.delta(),))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        f0, df = self.taylor_terms(*args, **kwargs)
        return tree_map(torch.add, f0, df)

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module itself at theta0 (no Taylor term): f(x; theta0)."""
        self._check_batchnorm()
        return _functional_call(self._shell, {**self._constants(), **self.theta0.as_dict()}, args, kwargs,
                                self._shared)

    def nonlinear(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped (non-linearized) module evaluated at the current theta: f(x; theta)."""
        return _functional_call(self._shell, {**self._constants(), **self.theta()}, args, kwargs, self._shared)


def linearize(module: nn.Module, params0: Mapping[str, torch.Tensor] | None = None,
              engine: str = "jvp") -> LinearizedModule:
    """First-order Taylor model of ``module`` around ``params0`` (default: its current parameters).

    ``engine="jvp"`` (default, the reference) uses ``torch.func.jvp``; ``engine="onepass"`` the
    hand-written (primal, tangent) engine of :mod:`linft.core.tangent` (same values, faster).

    Returns a :class:`LinearizedModule` with ``module``'s call signature and parameter names.
    BatchNorm statistics are frozen (see module docstring); ``module`` is not modified.
    """
    return LinearizedModule(module, params0, engine)
