"""``distance``: how far fine-tuning moved the weights. One run: |theta_ft - theta0| per parameter,
per block (the first two components of a parameter's name: a residual block, a stem piece or the
head's classifier) and in total, absolute and relative to |theta0| ([ZB] Sec. 3: the fine-tuned
weights stay close to the pre-trained ones). Two runs (which must share the pre-trained weights):
both runs' distances and the cosine and distance between their fine-tuning deltas."""
from __future__ import annotations

from linft.analysis.loading import LoadedRun, check_pair
from linft.analysis.spec import Analysis
from linft.core.params import block_of, delta_comparison, weight_distance


def _distance_rows(run: LoadedRun, label: str) -> list[dict]:
    rows = []
    for d in weight_distance(run.theta, run.theta0):
        names = [d["layer"]] if d["level"] == "param" else None
        is_head = (names and names[0] in run.head_names) or (d["level"] == "block" and any(
            block_of(n) == d["layer"] for n in run.head_names))
        extra = dict(level=d["level"], layer=d["layer"], numel=d["numel"], endpoint_a="theta0", endpoint_b=label,
                     theta0=run.theta0_head if is_head else ("pretrained" if d["level"] != "total" else "mixed"),
                     step=run.cfg.steps)
        for metric in ("distance", "norm0", "relative"):
            rows.append(dict(extra, metric=metric, value=d[metric]))
    return rows


def distance(runs: list[LoadedRun]) -> tuple[list[dict], dict]:
    a = runs[0]
    rows = _distance_rows(a, f"ft:{a.id}")
    info = {"grouping": "level=block groups parameters by the first two components of their name "
                        "(a residual block, a stem piece or the head's classifier)",
            "theta0_head": a.theta0_head}
    if len(runs) == 2:
        b = runs[1]
        shared = check_pair(a, b, same_function=False)
        rows += [dict(r, endpoint_b=f"ft:{b.id}") for r in _distance_rows(b, f"ft:{b.id}")]
        da = {n: a.theta[n] - a.theta0[n] for n in a.theta}
        db = {n: b.theta[n] - b.theta0[n] for n in a.theta}
        for d in delta_comparison(da, db):
            for metric in ("cosine", "distance"):
                rows.append(dict(level=d["level"], layer=d["layer"], metric=f"delta_{metric}", value=d[metric],
                                 endpoint_a=f"ft:{a.id}", endpoint_b=f"ft:{b.id}", theta0_shared=shared))
        info["theta0_shared"] = shared
    return rows, info


ANALYSIS = Analysis(
    "distance", distance, runs=(1, 2),
    help="weight distance |theta_ft - theta0| (per parameter, block, total); two runs: cosine of their deltas",
    summary=("relative", "distance", "delta_cosine"),
    doc="distance: |theta - theta0| total (relative to |theta0|), cosine of two runs' fine-tuning deltas.")
