"""Model selection inside a run (DomainBed's rules, [ZB] Sec. 4): the stopping step is chosen by
training-domain validation accuracy (mean over training domains of the "out" split); the
test-domain oracle (test domains' "out" split) is recorded beside it for reference.

Rows: ``kind="select"``, ``selection`` in {"train_val", "oracle"}, ``model`` (current, traj_avg,
traj_ens), ``step`` (the chosen one), and every env/split accuracy and loss at that step.
"""
from __future__ import annotations

from collections import defaultdict

from linft.runs.config import RunConfig


def _criterion(evals: dict, roles: dict, role: str) -> dict[int, float]:
    """step -> mean accuracy of the ``role`` domains' out splits."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for (step, env, split, metric), v in evals.items():
        if metric == "acc" and split == "out" and roles.get(env) == role:
            by_step[step].append(v)
    return {s: sum(v) / len(v) for s, v in by_step.items() if v}


def choose_step(scores: dict[int, float]) -> int | None:
    """The step with the best score, earliest on ties."""
    return min(scores, key=lambda s: (-scores[s], s)) if scores else None


def selection_rows(cfg: RunConfig, rows: list[dict]) -> list[dict]:
    out = []
    for model in ("current", "traj_avg", "traj_ens"):
        evals = {(r["step"], r["env"], r["split"], r["metric"]): r["value"]
                 for r in rows if r.get("kind") == "eval" and r.get("model") == model}
        roles = {r["env"]: r["role"] for r in rows if r.get("kind") == "eval" and r.get("model") == model}
        for selection, role in (("train_val", "train"), ("oracle", "test")):
            step = choose_step(_criterion(evals, roles, role))
            if step is None:
                continue
            for (s, env, split, metric), v in sorted(evals.items()):
                if s == step:
                    out.append(dict(run=cfg.run_id, kind="select", selection=selection, model=model, step=step,
                                    env=env, role=roles[env], split=split, metric=metric, value=v))
    return out
