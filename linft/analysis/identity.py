"""``identity``: the linear-model identities (paper_notes.md section 7) measured on two runs (or
theta0 -> theta_ft of one run; endpoints as in :mod:`linft.analysis.interp`, checked the same way):
``midpoint_gap_rel`` = ||f(mid) - (f_A + f_B)/2||_F / (||f_A - f_B||_F / 2), also relative to
||(f_A + f_B)/2||_F (``midpoint_gap_rel_mean``), ``max_gap_rel`` = max_a ||f(theta(a)) -
logit_mix(a)||_F / ||f_B - f_A||_F, the loss barrier w.r.t. the straight line on a uniform grid
(>= 0 by construction: the grid holds the endpoints) and ``min_chord_excess`` = min_a of L(a) minus
the chord (<= 0 when L is convex along the path). For two linearized runs sharing theta0 (head
included; pairs that do not are refused) the gaps and the barrier are 0 up to float error.
"""
from __future__ import annotations

from linft.analysis.loading import BN_POLICIES, cat, endpoints, group_keys, logits_at, loss_acc, rel_norm
from linft.analysis.spec import Analysis, Option
from linft.core.connectivity import barrier, chord_excess, uniform_grid
from linft.core.params import lerp


def identity(runs, grid=21, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = run.features()[1], group_keys(run)
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
        gaps = [rel_norm(cat(logits[a], ks) - ((1 - a) * xa + a * xb), xb - xa) for a in alphas]
        curve = {a: loss_acc(cat(logits[a], ks), y)["loss"] for a in alphas}
        value, arg = barrier(curve, "line")
        excess = chord_excess(curve)
        rows += [dict(common, **fields, metric="midpoint_gap_rel", value=rel_norm(mid - mean, (xa - xb) / 2)),
                 dict(common, **fields, metric="midpoint_gap_rel_mean", value=rel_norm(mid - mean, mean)),
                 dict(common, **fields, metric="max_gap_rel", value=max(gaps)),
                 dict(common, **fields, metric="loss_barrier", definition="line", value=value, alpha_max=arg,
                      n_points=len(alphas)),
                 dict(common, **fields, metric="min_chord_excess", value=min(excess.values()))]
    return rows, dict(info, n_points=len(alphas))


ANALYSIS = Analysis(
    "identity", identity, runs=(1, 2),
    help="linear-model identities: f(midpoint) vs mean of the endpoint logits, straight-line loss barrier",
    options=(Option("grid", 21, "uniform grid points on [0, 1], both endpoints included"), Option("bn_policy", "frozen", "BatchNorm along the path: the runs' shared pre-trained statistics", choices=BN_POLICIES)),
    summary=("midpoint_gap_rel", "loss_barrier"), label=("definition",),
    doc="identity: how far f((A+B)/2) is from (f(A)+f(B))/2 and the loss barrier on the straight path "
        "(>= 0; 0 for linearized runs sharing theta0).")
