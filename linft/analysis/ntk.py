"""``ntk``: the change of the empirical neural tangent kernel during fine-tuning ([ZB] Sec. 3; Fort
et al. 2020). The kernel of the trained module in the tail + head parameters (a full run's trunk
parameters are held fixed at the same point) on a probe of ``probe_size`` examples of the training
domains' ``out`` split drawn with a seeded permutation, at theta0 and at theta_ft; the kernel
distance 1 - <K0, K1>_F / (|K0| |K1|), norms, traces and the centered alignment with the labels.

``form``: ``"trace"`` (default, [N, N]: the class dimensions traced out) or ``"full"``
([N, C, N, C]). The two are different numbers -- on the same run the trace form's distance can
read orders of magnitude smaller than the full kernel's (a tiny tail run: 3.6e-7 vs 2.1e-4) -- so
every row carries ``form`` and ``form`` is part of the analysis id; a full-form analysis also reports the distance of
its traced kernels (``kernel_distance_trace``). For a linearized run the kernel is J(theta0) at any
theta, so the distance is 0 up to float error.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from linft.analysis.loading import LoadedRun
from linft.analysis.spec import Analysis, Option
from linft.core.ntk import empirical_ntk, frobenius, kernel_distance, label_alignment, trace_form
from linft.errors import LinftError
from linft.runs.modes import get_mode


def probe_batch(run: LoadedRun, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` examples of the training domains' out split (seeded permutation, sorted indices)."""
    feats, labels = run.features()
    roles = run.roles()
    keys = [k for k in feats if roles[k[0]] == "train" and k[1] == "out"]
    if not keys:
        raise LinftError(f"{run.id} has no training-domain out split to probe the NTK on")
    x = torch.cat([torch.cat(feats[k]) for k in keys])
    y = torch.cat([labels[k] for k in keys])
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return x[idx.to(x.device)], y[idx]


def ntk_names(run: LoadedRun) -> list[str]:
    """Tail + head parameters: everything trained, except a full run's trunk (child "0")."""
    if get_mode(run.cfg.mode).trunk_trains:
        return [n for n in run.theta if not n.startswith("0.")]
    return list(run.theta)


def kernel_at(run: LoadedRun, theta: dict, x: torch.Tensor, form: str = "trace", method: str = "auto",
              memory_bytes: float = 2 ** 31) -> torch.Tensor:
    """The empirical NTK of the run's trainable module at ``theta`` on ``x``, in the parameters
    :func:`ntk_names` (the others held at their value in ``theta``)."""
    names, module = ntk_names(run), run.trainable
    fixed = {n: t for n, t in theta.items() if n not in names}

    def fn(p, xb):
        return functional_call(module, {**fixed, **p}, (xb,))
    return empirical_ntk(fn, {n: theta[n] for n in names}, x, form=form, method=method, memory_bytes=memory_bytes)


def ntk(runs, probe_size=64, probe_seed=0, form="trace", method="auto", memory_bytes=2 ** 31):
    run = runs[0]
    x, y = probe_batch(run, probe_size, probe_seed)
    names = ntk_names(run)
    k0, k1 = (kernel_at(run, theta, x, form, method, memory_bytes) for theta in (run.theta0, run.theta))
    t0, t1 = (k0, k1) if form == "trace" else (trace_form(k0), trace_form(k1))
    c = run.trainer.data.num_classes
    common = dict(env="pooled", role="train", split="out", form=form, probe_size=len(x), linear_run=run.linear,
                  endpoint_a="theta0", endpoint_b=f"ft:{run.id}")
    rows = [dict(common, metric="kernel_distance", value=kernel_distance(k0, k1))]
    if form == "full":
        rows.append(dict(common, metric="kernel_distance_trace", value=kernel_distance(t0, t1)))
    for at, k, t in (("theta0", k0, t0), ("ft", k1, t1)):
        rows += [dict(common, at=at, metric="frobenius", value=frobenius(k)),
                 dict(common, at=at, metric="trace", value=float(torch.diagonal(t).double().sum())),
                 dict(common, at=at, metric="label_alignment", value=label_alignment(t, y, c))]
    return rows, {"n_params": sum(run.theta[n].numel() for n in names), "probe_size": len(x),
                  "parameters": "tail+head" if get_mode(run.cfg.mode).trunk_trains else "trainable"}


ANALYSIS = Analysis(
    "ntk", ntk, runs=(1, 1),
    help="empirical NTK at theta0 and theta_ft and the kernel distance (label: trace or full form)",
    options=(Option("probe_size", 64, "probe examples (training domains' out split)"),
             Option("probe_seed", 0, "seed of the probe's permutation"),
             Option("form", "trace", "kernel form: trace [N,N] or full [N,C,N,C] (different numbers)",
                    choices=("trace", "full")),
             Option("method", "auto", "how the kernel is computed", choices=("auto", "jacobian", "ntvp"),
                    semantic=False),
             Option("memory_bytes", 2 ** 31, "memory budget of the kernel computation", semantic=False)),
    summary=("kernel_distance",), label=("form",),
    doc="ntk: kernel distance 1 - <K0,K1>/(|K0||K1|) between theta0 and theta_ft, in the form of its row "
        "('form=trace' [N,N] or 'form=full' [N,C,N,C]: not comparable across forms).")
