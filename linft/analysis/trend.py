"""``trend``: how linear fine-tuning is as the fine-tuning set grows ([ZB] Sec. 4: linearity degrades
with data size). Several runs that differ only in ``n_per_domain`` (and mode, feature cache,
augmentation); per run, the analyses in ``kinds`` (each stored under its run as usual) summarised as
``kind="trend"`` rows keyed by ``n`` (training examples per domain, after ``n_per_domain``), with
the member's ``run``, ``n_per_domain``, ``mode`` and ``p`` (and ``form`` on ntk rows). The trend
folder lives under the first run. Options beyond ``kinds`` and the common ones (e.g. the ntk's
``probe_size``) go only to the analyses in ``kinds`` that take them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from linft.analysis.loading import run_config
from linft.analysis.spec import Analysis, Option
from linft.errors import LinftError

_TREND_VARY = {"n_per_domain", "mode", "feature_cache", "augment"}
# per kind: the rows a trend keeps (metric -> trend metric name); other kinds: their summary metrics
PICK = {"distance": ("distance", "relative"), "linearity": ("r2", "agreement", "rel_err_l2", "halving_ratio_l2"),
        "ntk": ("kernel_distance",), "interp": ("loss_barrier",), "identity": ("loss_barrier",)}


def _examples_per_domain(cfg) -> int:
    from linft.training.run_data import RunData
    data = RunData(cfg.replace(device="cpu"), torch.device("cpu"))
    return min(len(s.indices("in")) for s in data.splits if s.role == "train")


def _keep(kind: str, r: dict, analysis: Analysis) -> bool:
    if r["metric"] not in PICK.get(kind, analysis.summary):
        return False
    if kind == "distance":
        return r.get("level") == "total"
    if kind in ("interp", "identity"):
        return r.get("env") == "pooled" and r.get("definition") == "line"
    if kind == "ntk":
        return True
    return analysis.is_headline(r)


def trend(paths: list[Path], registry, kinds=("distance", "linearity", "ntk"), **options):
    cfgs = [run_config(p) for p in paths]
    ref = {k: v for k, v in cfgs[0].semantic_diff().items() if k not in _TREND_VARY}
    for p, c in zip(paths, cfgs):
        d = {k: v for k, v in c.semantic_diff().items() if k not in _TREND_VARY}
        if d != ref:
            keys = sorted(k for k in set(d) | set(ref) if d.get(k) != ref.get(k))
            raise LinftError(f"{p.name} differs from {paths[0].name} in {', '.join(keys)}: a size trend needs runs "
                             "that differ only in n_per_domain (and mode)")
    analyses = {kind: registry.get(kind) for kind in kinds}
    taken = {o.name for a in analyses.values() for o in a.all_options}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise LinftError(f"unknown option(s) for trend of {', '.join(kinds)}: {', '.join(unknown)}")
    rows = []
    for p, c in zip(paths, cfgs):
        base = dict(run=p.name, n=_examples_per_domain(c), n_per_domain=c.n_per_domain, mode=c.mode, p=c.p)
        for kind, analysis in analyses.items():
            mine = {k: v for k, v in options.items() if k in {o.name for o in analysis.all_options}}
            for r in registry.analyze(kind, [p], **mine):
                if not _keep(kind, r, analysis):
                    continue
                where = {k: r[k] for k in ("env", "role", "split", "form") if k in r}
                rows.append(dict(base, **where, metric=f"{kind}_{r['metric']}", value=r["value"], source=r["analysis"]))
    return rows, {"kinds": list(kinds), "members": [p.name for p in paths]}


ANALYSIS = Analysis(
    "trend", trend, runs=(2, None), reads="paths", open_options=True,
    help="size trend: summaries of other analyses over runs that differ only in n_per_domain",
    options=(Option("kinds", ("distance", "linearity", "ntk"), "analyses to summarise per run (comma-separated)",
                    item=str),),
    figure="trend")
