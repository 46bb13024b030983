"""``interp``: loss and accuracy along a straight path in weight space ([ZB] Sec. 3; linear mode
connectivity, Frankle et al. 2020), with loss and 0-1 error barriers (paper_notes.md section 6).

Endpoints: one run -> (theta0, theta_ft): pre-trained -> fine-tuned, with the head at a = 0 its
initial value (``head_at_0="init"``, or ``"probe"`` for LP-FT runs); two runs -> (theta_A, theta_B),
which must share the pre-trained weights, the frozen parts and the data, and, for two linearized
runs, all of theta0 (checked, :func:`linft.analysis.loading.check_pair`). The path is
theta(a) = (1 - a) theta_A + a theta_B over the trained parameters; frozen parts and BatchNorm
statistics are the runs' shared ones (``bn_policy="frozen"``). a = 0 and a = 1 evaluate the
endpoint parameters themselves (bit-identical to evaluating the endpoint model).

Loss and accuracy on a uniform grid (endpoints included) refined by bisection around the argmax of
each pooled loss curve (both barrier definitions) until the spacing there is below
``min_spacing``; loss and 0-1 error barriers under both definitions (:mod:`linft.core.connectivity`).
Refined points carry ``grid="refined"``. The barrier w.r.t. the straight line (``definition="line"``)
is >= 0 by construction (the grid holds both endpoints, where the excess is 0): 0 means no
barrier; ``definition="mean"`` (w.r.t. the endpoint mean) may be negative.
"""
from __future__ import annotations

from linft.analysis.loading import BN_POLICIES, cat, endpoints, group_keys, logits_at, loss_acc
from linft.analysis.spec import Analysis, Option
from linft.core.connectivity import barrier, refine_max, uniform_grid
from linft.core.params import lerp


def interp(runs, grid=11, min_spacing=1 / 80, refine=True, bn_policy="frozen"):
    run = runs[0]
    A, B, la, lb, info = endpoints(runs)
    labels, groups = run.features()[1], group_keys(run)
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



ANALYSIS = Analysis(
    "interp", interp, runs=(1, 2),
    help="loss/accuracy along (1-a) theta_A + a theta_B (or theta0 -> theta_ft) and the barriers",
    options=(Option("grid", 11, "uniform grid points on [0, 1], both endpoints included"),
             Option("min_spacing", 1 / 80, "refine around the maximum until the spacing there is below this"),
             Option("refine", True, "refine the grid around the maximum (--no-refine: uniform grid only)"),
             Option("bn_policy", "frozen", "BatchNorm along the path: the runs' shared pre-trained statistics", choices=BN_POLICIES)),
    summary=("loss_barrier", "error_barrier"), label=("definition",), figure="interpolation_curves",
    doc="interp: barriers w.r.t. the straight line between the endpoint values ('line', >= 0 on a grid holding "
        "the endpoints: 0 = no barrier) and w.r.t. the endpoint mean ('mean').")
