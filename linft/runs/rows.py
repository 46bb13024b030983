"""The tidy row: the one contract between the layers. Every measurement linft writes is one JSON
object in a run's ``results.jsonl`` or in a child folder's ``rows.jsonl`` (analyses, soups, trends);
the run's config is stored once (``config.json``) and joined at collection, never copied into rows.

Keys (a row carries the ones that apply; :data:`SCHEMA` is the reference):
"""
from __future__ import annotations

import math
from typing import Any

SCHEMA: dict[str, str] = {
    "run": "run id the row belongs to (the folder name, '<mode>-<sha256[:12]>')",
    "kind": "train | eval | select | distance | interp | funcinterp | identity | linearity | ntk | trajectory | trend | soup | ...",
    "step": "optimisation step (int); for 'select' rows the step the selection chose",
    "alpha": "interpolation coefficient in [0, 1] along a path from endpoint_a (0) to endpoint_b (1)",
    "t": "fraction of the fine-tuning delta (Taylor fidelity along theta0 + t (theta - theta0))",
    "model": "current | traj_avg (trajectory weight average) | traj_ens (trajectory ensemble) | "
             "uniform_soup | greedy_soup | output_ensemble",
    "selection": "'select' rows: train_val (training-domain validation) | oracle (test-domain 'out' split)",
    "env": "domain NAME (never an index); 'pooled' for rows over several domains",
    "role": "train | test: whether env is a training or a test domain of the run",
    "split": "in | out (the held-out fraction) | all",
    "metric": "what value measures (acc: fraction correct; loss: mean cross-entropy in nats; ...)",
    "value": "the number (float; non-finite values are written as the strings 'nan', 'inf', '-inf')",
    "analysis": "child rows: the analysis folder's id '<kind>-<sha256[:12]>' (its config.json holds the options)",
    "layer": "parameter or block name (distance rows)",
    "level": "param | block | total (distance rows)",
    "endpoint_a": "path start: 'theta0' or 'ft:<run id>'",
    "endpoint_b": "path end: 'ft:<run id>'",
    "bn_policy": "BatchNorm policy of an interpolation or linearization (frozen: pre-trained statistics)",
    "definition": "which variant of a measurement (e.g. posthoc | trained; line | mean barriers; trace | full kernel)",
    "members": "soups/ensembles: number of member runs the model combines",
    "member_runs": "soups: the member run ids",
    "combine": "soups/ensembles: mean_weights (a soup) | mean_logits (an output ensemble; [ZB] sums logits: "
               "same accuracy, different loss)",
    "form": "ntk rows: trace ([N, N], the trace over classes) | full ([N, C, N, C]); the two kernel distances "
            "differ by orders of magnitude on the same run",
    "source": "trend rows: the analysis folder id the number was read from",
    "n": "trend rows: training examples per domain of the member run",
}


def clean(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: keep the fact as a readable string."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
