"""How linear a fine-tuning run is: Taylor fidelity, kernel change, and their trend with data size
(see :mod:`linft.analysis.loading` for folders and rows).

- ``linearity``, one standard run (tail/full/probe/unfolded): post-hoc linearization -- the run's own
  first-order Taylor model around theta0, ``linearize(trainable, params0=theta0)``, against the
  network, both at theta(t) = theta0 + t (theta_ft - theta0) for t in ``ts`` (default 0.25, 0.5, 1).
  The run keeps only its last checkpoint, so "along training" is replaced by this straight path.
  Statistics per split and pooled (:mod:`linft.core.fidelity`: R^2, agreement, relative errors,
  residual norms) and ``halving_ratio_l2`` / ``_l1`` = residual(t) / residual(t/2) for every t whose
  half is in ``ts`` (~4 quadratic; ~2.8 in L2 for ReLU kinks, paper_notes.md section 1).
  ``definition="posthoc"``. For a linearized run the roles swap: its Taylor model (the trained
  model) against the real network at the same theta (``definition="network_at_linear_theta"``).
- ``linearity``, a linearized run and a standard run of the same config otherwise
  (``definition="trained"``): each evaluated as trained; accuracy and loss of both, the gaps
  (linear minus standard) and the prediction agreement, per split and pooled.
- ``ntk``: the empirical NTK (trace form [N, N], or ``form="full"`` [N, C, N, C]) of the trained
  module in the tail + head parameters (a full run's trunk parameters are held fixed at the same
  point) on a probe of ``probe_size`` examples of the training domains' ``out`` split drawn with a
  seeded permutation; at theta0 and at theta_ft; the kernel distance 1 - <K0, K1>_F / (|K0| |K1|)
  (Fort et al. 2020), norms, traces and the centered alignment with the labels. For a linearized
  run the kernel is J(theta0) at any theta, so the distance is 0 up to float error.
- :func:`size_trend`: several runs that differ only in ``n_per_domain`` (and mode): the analyses
  above per run, summarised as ``kind="trend"`` rows keyed by ``n`` (training examples per domain).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from linft.analysis.loading import LoadedRun, _run_config, analyze, cat, check_pair, group_keys, logits_at, loss_acc, read_rows
from linft.core.fidelity import agreement, fidelity, halving_ratio
from linft.core.linearize import linearize
from linft.core.ntk import empirical_ntk, frobenius, kernel_distance, label_alignment, trace_form
from linft.core.params import lerp
from linft.runs.modes import get_mode
from linft.errors import LinftError
from linft.runs.store import atomic_write_text


class _Call(nn.Module):
    """``forward`` = ``module.<method>`` (to evaluate LinearizedModule.nonlinear functionally)."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.m, self.method = module, method

    def forward(self, x):
        return getattr(self.m, self.method)(x)


def _prefixed(params: dict, prefix: str) -> dict:
    return {prefix + n: t for n, t in params.items()}


def linearity(runs, ts=(0.25, 0.5, 1.0), engine="jvp", bn_policy="frozen"):
    if len(runs) == 2:
        return _trained_pair(runs, bn_policy)
    run = runs[0]
    if run.linear:
        lin, lin_p = run.trainable, ""
        net, net_p = _Call(run.trainable, "nonlinear"), "m."
        definition = "network_at_linear_theta"
    else:
        lin, lin_p = linearize(run.trainable, params0=run.theta0, engine=engine), ""
        net, net_p = run.trainable, ""
        definition = "posthoc"
    lin.eval()
    groups = group_keys(run)
    f0 = logits_at(run, _prefixed(run.theta0, net_p), net)
    common = dict(definition=definition, path="straight", endpoint_a="theta0", endpoint_b=f"ft:{run.id}",
                  bn_policy=bn_policy)
    rows, residual = [], {}
    for t in ts:
        theta_t = lerp(run.theta0, run.theta, t) if t in (0.0, 1.0) else \
            {n: run.theta0[n] + t * (run.theta[n] - run.theta0[n]) for n in run.theta}
        f = logits_at(run, _prefixed(theta_t, net_p), net)
        g = logits_at(run, _prefixed(theta_t, lin_p), lin)
        for fields, ks in groups:
            stats = fidelity(cat(f, ks), cat(g, ks), cat(f0, ks))
            residual[(t, fields["env"], fields["role"], fields["split"])] = stats
            rows += [dict(common, **fields, t=t, metric=k, value=v) for k, v in stats.items()]
    for t in ts:
        if t / 2 not in ts:
            continue
        for fields, _ in groups:
            key = (fields["env"], fields["role"], fields["split"])
            for norm in ("l2", "l1"):
                r = halving_ratio(residual[(t, *key)][f"residual_{norm}"], residual[(t / 2, *key)][f"residual_{norm}"])
                rows.append(dict(common, **fields, t=t, metric=f"halving_ratio_{norm}", value=r))
    return rows, {"definition": definition, "engine": engine,
                  "path": "theta0 + t (theta_ft - theta0): the run keeps only its last checkpoint"}


_MAY_DIFFER = {"mode", "feature_cache", "augment"}


def _trained_pair(runs, bn_policy):
    a, b = runs
    if a.linear == b.linear:
        raise LinftError("linearity on two runs compares a linearized run with a standard one; got modes "
                         f"{a.cfg.mode} and {b.cfg.mode}")
    da = {k: v for k, v in a.cfg.semantic_diff().items() if k not in _MAY_DIFFER}
    db = {k: v for k, v in b.cfg.semantic_diff().items() if k not in _MAY_DIFFER}
    if da != db:
        keys = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
        raise LinftError(f"runs {a.id} and {b.id} differ in {', '.join(keys)} (beyond mode): not the same config")
    shared = check_pair(a, b, same_function=False)
    lin, std = (a, b) if a.linear else (b, a)
    fl, fs = logits_at(lin, lin.theta), logits_at(std, std.theta)
    labels = lin.features()[1]
    common = dict(definition="trained", endpoint_a=f"linear:{lin.id}", endpoint_b=f"standard:{std.id}",
                  bn_policy=bn_policy, theta0_shared=shared)
    rows = []
    for fields, ks in group_keys(lin):
        y, l, s = cat(labels, ks), cat(fl, ks), cat(fs, ks)
        ml, ms = loss_acc(l, y), loss_acc(s, y)
        for k, v in (("acc_linear", ml["acc"]), ("acc_standard", ms["acc"]), ("acc_gap", ml["acc"] - ms["acc"]),
                     ("loss_linear", ml["loss"]), ("loss_standard", ms["loss"]), ("loss_gap", ml["loss"] - ms["loss"]),
                     ("agreement", agreement(l, s))):
            rows.append(dict(common, **fields, metric=k, value=v))
    return rows, {"definition": "trained", "linear_run": lin.id, "standard_run": std.id, "theta0_shared": shared}


# -- ntk -----------------------------------------------------------------------------------------
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


def ntk(runs, probe_size=64, probe_seed=0, form="trace", method="auto", memory_bytes=2 ** 31):
    run = runs[0]
    x, y = probe_batch(run, probe_size, probe_seed)
    names = ntk_names(run)
    module = run.trainable

    def kernel(theta):
        fixed = {n: t for n, t in theta.items() if n not in names}

        def fn(p, xb):
            return functional_call(module, {**fixed, **p}, (xb,))
        return empirical_ntk(fn, {n: theta[n] for n in names}, x, form=form, method=method,
                             memory_bytes=memory_bytes)
    k0, k1 = kernel(run.theta0), kernel(run.theta)
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


# -- trend with data size ------------------------------------------------------------------------
_TREND_VARY = {"n_per_domain", "mode", "feature_cache", "augment"}


def _examples_per_domain(cfg) -> int:
    from linft.training.run_data import RunData
    data = RunData(cfg.replace(device="cpu"), torch.device("cpu"))
    return min(len(s.indices("in")) for s in data.splits if s.role == "train")


_COMMON_OPTIONS = ("weights", "dtype", "device")
_KIND_OPTIONS = {"ntk": ("probe_size", "probe_seed", "form", "method", "memory_bytes"),
                 "linearity": ("ts", "engine", "bn_policy")}


def size_trend(runs, kinds=("distance", "linearity", "ntk"), **options) -> list[dict]:
    """Per run: ``n`` (training examples per domain, after ``n_per_domain``) and summary metrics of
    ``kinds`` as ``kind="trend"`` rows, stored in ``<root of the first run>/_trends/<id>/``.
    ``options``: ``weights``, ``dtype``, ``device`` go to every analysis, the others (e.g. the ntk's
    ``probe_size``) only to the analyses that take them."""
    paths = [Path(p) for p in runs]
    cfgs = [_run_config(p) for p in paths]
    ref = {k: v for k, v in cfgs[0].semantic_diff().items() if k not in _TREND_VARY}
    for p, c in zip(paths, cfgs):
        d = {k: v for k, v in c.semantic_diff().items() if k not in _TREND_VARY}
        if d != ref:
            keys = sorted(k for k in set(d) | set(ref) if d.get(k) != ref.get(k))
            raise LinftError(f"{p.name} differs from {paths[0].name} in {', '.join(keys)}: a size trend needs runs "
                             "that differ only in n_per_domain (and mode)")
    blob = json.dumps({"runs": [p.name for p in paths], "kinds": list(kinds), "options": options}, sort_keys=True)
    folder = paths[0].parent / "_trends" / f"trend-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (folder / "done").exists():
        return read_rows(folder)
    rows = []
    for p, c in zip(paths, cfgs):
        base = dict(kind="trend", run=p.name, n=_examples_per_domain(c), n_per_domain=c.n_per_domain, mode=c.mode,
                    p=c.p)
        for kind in kinds:
            mine = {k: v for k, v in options.items() if k in _COMMON_OPTIONS or k in _KIND_OPTIONS.get(kind, ())}
            for r in analyze(kind, [p], **mine):
                rows += _summary(kind, r, base)
    atomic_write_text(folder / "config.json", json.dumps({"runs": [p.name for p in paths], "kinds": list(kinds),
                                                          "options": options}, indent=1) + "\n")
    atomic_write_text(folder / "rows.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(folder / "done", "")
    return rows


def _summary(kind: str, r: dict, base: dict) -> list[dict]:
    where = {k: r[k] for k in ("env", "role", "split") if k in r}
    if kind == "distance" and r.get("level") == "total" and r["metric"] in ("distance", "relative"):
        return [dict(base, metric=f"distance_{r['metric']}", value=r["value"])]
    if kind == "linearity" and r.get("env") == "pooled" and r.get("t") == 1.0 and r["metric"] in (
            "r2", "agreement", "rel_err_l2", "halving_ratio_l2"):
        return [dict(base, **where, metric=f"linearity_{r['metric']}", value=r["value"])]
    if kind == "ntk" and r["metric"] == "kernel_distance":
        return [dict(base, **where, metric="ntk_kernel_distance", value=r["value"])]
    if kind in ("interp", "identity") and r.get("env") == "pooled" and r["metric"] == "loss_barrier" \
            and r.get("definition") == "line":
        return [dict(base, **where, metric=f"{kind}_loss_barrier", value=r["value"])]
    return []
