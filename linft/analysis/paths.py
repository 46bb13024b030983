"""Analyses along straight paths in weight space (see :mod:`linft.analysis.loading` for folders and rows).

Endpoints: one run -> (theta0, theta_ft): pre-trained -> fine-tuned, with the head at a = 0 its
initial value (``head_at_0="init"``, or ``"probe"`` for LP-FT runs); two runs -> (theta_A, theta_B),
which must share the pre-trained weights, the frozen parts and the data (checked). The path is
theta(a) = (1 - a) theta_A + a theta_B over the trained parameters; frozen parts and BatchNorm
statistics are the runs' shared ones (``bn_policy="frozen"``). a = 0 and a = 1 evaluate the
endpoint parameters themselves (bit-identical to evaluating the endpoint model).

- ``interp``: loss and accuracy along the path on a uniform grid (endpoints included) refined by
  bisection around the argmax of each pooled loss curve (both barrier definitions) until the
  spacing there is below ``min_spacing``; loss and 0-1 error barriers under both definitions
  (:mod:`linft.core.connectivity`). Refined points carry ``grid="refined"``.
- ``funcinterp`` ([ZB] Fig. 1): at each a, the network at the mixed weights (``model="weights"``)
  against three mixtures of the endpoints: ``logit_mix`` (1-a) f_A + a f_B, ``prob_mix``
  (1-a) softmax f_A + a softmax f_B (loss = -log of the mixed probability of the label), and
  ``rep_mix``: the representation Phi (the head's pooled input, before dropout) mixed,
  (1-a) Phi_A + a Phi_B, through the head at the mixed head weights (W(a), b(a)); defined when the
  trained module is ``body -> head`` (tail, full, probe runs; not for linearized or unfolded runs).
  Gaps: ``acc_gap`` / ``loss_gap`` = weights minus mixture, ``logit_gap_rel`` =
  ||f(theta(a)) - mixture||_F / ||f_B - f_A||_F over the split.
- ``identity``: the linear-model identities (paper_notes.md section 7) measured on the runs:
  ``midpoint_gap_rel`` = ||f(mid) - (f_A + f_B)/2||_F / (||f_A - f_B||_F / 2), also relative to
  ||(f_A + f_B)/2||_F (``midpoint_gap_rel_mean``), ``max_gap_rel`` = max_a ||f(theta(a)) -
  logit_mix(a)||_F / ||f_B - f_A||_F, and the loss barrier w.r.t. the straight line on a uniform
  grid. All are 0 (barrier <= 0) for linearized runs sharing theta0.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from linft.analysis.loading import LoadedRun, cat, check_pair, group_keys, logits_at, loss_acc
from linft.core.connectivity import barrier, chord_excess, refine_max, uniform_grid
from linft.core.heads import pool
from linft.core.params import lerp


def endpoints(runs: list[LoadedRun]) -> tuple[dict, dict, str, str, dict]:
    if len(runs) == 1:
        r = runs[0]
        return r.theta0, r.theta, "theta0", f"ft:{r.id}", {"head_at_0": "init" if r.theta0_head != "probe" else "probe"}
    a, b = runs
    shared = check_pair(a, b)
    return a.theta, b.theta, f"ft:{a.id}", f"ft:{b.id}", {"theta0_shared": shared}


def _labels(run: LoadedRun):
    return run.features()[1]


# -- interp --------------------------------------------------------------------------------------
def interp(runs, grid=11, min_spacing=1 / 80, refine=True, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = _labels(run), group_keys(run)
    cache: dict[float, list[dict]] = {}

    def evaluate(a: float) -> list[dict]:
        if a not in cache:
            lg = logits_at(run, lerp(A, B, a))
            cache[a] = [loss_acc(cat(lg, ks), cat(labels, ks)) for _, ks in groups]
        return cache[a]

    uniform = uniform_grid(grid)
    for a in uniform:
        evaluate(a)
    if refine:
        for gi, (fields, _) in enumerate(groups):
            if fields["env"] != "pooled":
                continue
            for definition in ("line", "mean"):
                def score(a, gi=gi, definition=definition):
                    v = evaluate(a)[gi]["loss"]
                    if definition == "mean":
                        return v
                    l0, l1 = cache[0.0][gi]["loss"], cache[1.0][gi]["loss"]
                    return v - ((1 - a) * l0 + a * l1)
                refine_max(score, {a: score(a) for a in list(cache)}, min_spacing)
    common = dict(endpoint_a=la, endpoint_b=lb, bn_policy=bn_policy, **info)
    rows = []
    for a in sorted(cache):
        for (fields, _), m in zip(groups, cache[a]):
            for metric, value in m.items():
                rows.append(dict(common, **fields, alpha=a, metric=metric, value=value,
                                 grid="uniform" if a in uniform else "refined"))
    for gi, (fields, _) in enumerate(groups):
        curves = {"loss": {a: v[gi]["loss"] for a, v in cache.items()},
                  "error": {a: 1 - v[gi]["acc"] for a, v in cache.items()}}
        for quantity, curve in curves.items():
            for definition in ("line", "mean"):
                value, arg = barrier(curve, definition)
                rows.append(dict(common, **fields, metric=f"{quantity}_barrier", definition=definition, value=value,
                                 alpha_max=arg, n_points=len(curve)))
    return rows, dict(info, n_points=len(cache), refined=len(cache) - len(uniform))


# -- funcinterp ----------------------------------------------------------------------------------
def _body_head(run: LoadedRun):
    """(body module or None, head module, head parameter prefix) when the trained module is
    body -> head; None otherwise."""
    trainable, head = run.trainable, run.trainer.pipe.head
    if trainable is head:
        return None, head, ""
    if isinstance(trainable, nn.Sequential) and list(trainable.children())[-1] is head:
        items = list(trainable._modules.items())
        return nn.Sequential(OrderedDict(items[:-1])), head, items[-1][0] + "."
    return None


@torch.no_grad()
def _reps(run: LoadedRun, body, params) -> dict:
    feats = run.features()[0]
    if body is None:
        return {k: torch.cat([pool(z).double().cpu() for z in zs]) for k, zs in feats.items()}
    p = {n: t for n, t in params.items() if n not in run.head_names}
    return {k: torch.cat([pool(functional_call(body, p, (z,))).double().cpu() for z in zs]) for k, zs in feats.items()}


@torch.no_grad()
def _head_logits(head, prefix, params, phi: torch.Tensor) -> torch.Tensor:
    hp = {n[len(prefix):]: t.detach().double().cpu() for n, t in params.items() if n.startswith(prefix)} if prefix \
        else {n: t.detach().double().cpu() for n, t in params.items()}
    return F.linear(phi, hp["fc.weight"], hp["fc.bias"])  # DropoutHead at evaluation: pool -> fc


def _prob_mix(xa, xb, a, y):
    pm = (1 - a) * torch.softmax(xa, 1) + a * torch.softmax(xb, 1)
    nll = -torch.log(pm.gather(1, y[:, None]).clamp_min(1e-300)).mean().item()
    return {"loss": nll, "acc": (pm.argmax(1) == y).double().mean().item()}


def _rel(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.norm())
    return float(num.norm()) / d if d > 0 else (0.0 if float(num.norm()) == 0 else float("inf"))


def funcinterp(runs, grid=11, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = _labels(run), group_keys(run)
    fa, fb = logits_at(run, A), logits_at(run, B)
    bh = _body_head(run)
    if bh is not None:
        body, head, prefix = bh
        pa, pb = _reps(run, body, A), _reps(run, body, B)
    common = dict(endpoint_a=la, endpoint_b=lb, bn_policy=bn_policy, **info)
    rows = []
    for a in uniform_grid(grid):
        theta_a = lerp(A, B, a)
        fw = fa if a == 0 else fb if a == 1 else logits_at(run, theta_a)
        rep_logits = None
        if bh is not None:
            rep_logits = {k: _head_logits(head, prefix, theta_a, (1 - a) * pa[k] + a * pb[k]) for k in pa}
        for fields, ks in groups:
            y, w, xa, xb = cat(labels, ks), cat(fw, ks), cat(fa, ks), cat(fb, ks)
            mixes = {"logit_mix": (1 - a) * xa + a * xb}
            models = {"weights": loss_acc(w, y), "logit_mix": loss_acc(mixes["logit_mix"], y),
                      "prob_mix": _prob_mix(xa, xb, a, y)}
            if rep_logits is not None:
                mixes["rep_mix"] = cat(rep_logits, ks)
                models["rep_mix"] = loss_acc(mixes["rep_mix"], y)
            base = dict(common, **fields, alpha=a)
            for model, m in models.items():
                rows += [dict(base, model=model, metric=k, value=v) for k, v in m.items()]
            for model in models:
                if model == "weights":
                    continue
                for m in ("acc", "loss"):
                    rows.append(dict(base, model=model, metric=f"{m}_gap", value=models["weights"][m] - models[model][m]))
                if model in mixes:
                    rows.append(dict(base, model=model, metric="logit_gap_rel", value=_rel(w - mixes[model], xb - xa)))
    return rows, dict(info, rep_mix=bh is not None)


# -- identity ------------------------------------------------------------------------------------
def identity(runs, grid=21, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = _labels(run), group_keys(run)
    alphas = uniform_grid(grid)
    if 0.5 not in alphas:
        alphas = sorted(alphas + [0.5])
    logits = {a: logits_at(run, lerp(A, B, a)) for a in alphas}
    fa, fb = logits[0.0], logits[1.0]
    common = dict(endpoint_a=la, endpoint_b=lb, bn_policy=bn_policy, **info)
    rows = []
    for fields, ks in groups:
        y, xa, xb, mid = cat(labels, ks), cat(fa, ks), cat(fb, ks), cat(logits[0.5], ks)
        mean = (xa + xb) / 2
        gaps = [_rel(cat(logits[a], ks) - ((1 - a) * xa + a * xb), xb - xa) for a in alphas]
        curve = {a: loss_acc(cat(logits[a], ks), y)["loss"] for a in alphas}
        value, arg = barrier(curve, "line")
        excess = chord_excess(curve)
        rows += [dict(common, **fields, metric="midpoint_gap_rel", value=_rel(mid - mean, (xa - xb) / 2)),
                 dict(common, **fields, metric="midpoint_gap_rel_mean", value=_rel(mid - mean, mean)),
                 dict(common, **fields, metric="max_gap_rel", value=max(gaps)),
                 dict(common, **fields, metric="loss_barrier", definition="line", value=value, alpha_max=arg,
                      n_points=len(alphas)),
                 dict(common, **fields, metric="min_chord_excess", value=min(excess.values()))]
    return rows, dict(info, n_points=len(alphas))
