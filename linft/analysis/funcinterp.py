"""``funcinterp`` ([ZB] Fig. 1): function-space vs weight-space interpolation. At each a of a uniform
grid, the network at the mixed weights theta(a) = (1 - a) theta_A + a theta_B (``model="weights"``;
endpoints as in :mod:`linft.analysis.interp`, checked the same way) against three mixtures of the
endpoints: ``logit_mix`` (1-a) f_A + a f_B, ``prob_mix`` (1-a) softmax f_A + a softmax f_B (loss =
-log of the mixed probability of the label), and ``rep_mix``: the representation Phi (the head's
pooled input, before dropout) mixed, (1-a) Phi_A + a Phi_B, through the head at the mixed head
weights (W(a), b(a)); defined when the trained module is ``body -> head`` (tail, full, probe runs;
not for linearized or unfolded runs). Gaps: ``acc_gap`` / ``loss_gap`` = weights minus mixture,
``logit_gap_rel`` = ||f(theta(a)) - mixture||_F / ||f_B - f_A||_F over the split.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from linft.analysis.loading import BN_POLICIES, LoadedRun, cat, endpoints, group_keys, logits_at, loss_acc, rel_norm
from linft.analysis.spec import Analysis, Option
from linft.core.connectivity import uniform_grid
from linft.core.heads import pool
from linft.core.params import lerp


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


def funcinterp(runs, grid=11, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = run.features()[1], group_keys(run)
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
                    rows.append(dict(base, model=model, metric="logit_gap_rel", value=rel_norm(w - mixes[model], xb - xa)))
    return rows, dict(info, rep_mix=bh is not None)



ANALYSIS = Analysis(
    "funcinterp", funcinterp, runs=(1, 2),
    help="the network at mixed weights vs mixed logits / probabilities / representations ([ZB] Fig. 1)",
    options=(Option("grid", 11, "uniform grid points on [0, 1], both endpoints included"), Option("bn_policy", "frozen", "BatchNorm along the path: the runs' shared pre-trained statistics", choices=BN_POLICIES)),
    summary=(), label=("model",))
