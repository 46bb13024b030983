"""``linearity``: how close fine-tuning stays to its first-order Taylor model ([ZB] Sec. 3-4).

- One standard run (tail/full/probe/unfolded): post-hoc linearization -- the run's own first-order
  Taylor model around theta0, ``linearize(trainable, params0=theta0)``, against the network, both at
  theta(t) = theta0 + t (theta_ft - theta0) for t in ``ts`` (default 0.25, 0.5, 1). The run keeps
  only its last checkpoint, so "along training" is replaced by this straight path. Statistics per
  split and pooled (:mod:`linft.core.fidelity`: R^2, agreement, relative errors, residual norms) and
  ``halving_ratio_l2`` / ``_l1`` = residual(t) / residual(t/2) for every t whose half is in ``ts``
  (~4 quadratic; ~2.8 in L2 for ReLU kinks, paper_notes.md section 1). ``definition="posthoc"``.
  For a linearized run the roles swap: its Taylor model (the trained model) against the real
  network at the same theta (``definition="network_at_linear_theta"``).
- A linearized run and a standard run of the same config otherwise (``definition="trained"``): each
  evaluated as trained; accuracy and loss of both, the gaps (linear minus standard) and the
  prediction agreement, per split and pooled.
"""
from __future__ import annotations

import torch.nn as nn

from linft.analysis.loading import BN_POLICIES, cat, check_pair, group_keys, logits_at, loss_acc
from linft.analysis.spec import Analysis, Option
from linft.core.fidelity import agreement, fidelity, halving_ratio
from linft.core.linearize import linearize
from linft.core.params import lerp
from linft.errors import LinftError


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


_MAY_DIFFER = {"mode", "feature_cache", "augment", "snapshot_steps"}  # snapshots change no weight


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


ANALYSIS = Analysis(
    "linearity", linearity, runs=(1, 2),
    help="Taylor fidelity of a run along theta0 + t (theta_ft - theta0); two runs: trained linear vs standard",
    options=(Option("ts", (0.25, 0.5, 1.0), "fractions t of the fine-tuning delta (comma-separated)"),
             Option("engine", "jvp", "Taylor engine of the post-hoc linearization", choices=("jvp", "onepass"),
                    semantic=False),
             Option("bn_policy", "frozen", "BatchNorm: the run's pre-trained statistics", choices=BN_POLICIES)),
    summary=("rel_err_l2", "agreement", "halving_ratio_l2", "acc_gap"), label=("definition",),
    figure="taylor_fidelity",
    doc="linearity: post-hoc Taylor model at theta_ft ('posthoc'), the network at a linearized run's theta "
        "('network_at_linear_theta'), a trained linear vs standard run ('trained').")
