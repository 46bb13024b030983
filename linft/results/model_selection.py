"""DomainBed-exact model selection on a neutral "checkpoint frame", plus the [ZB] protocol.

A checkpoint frame is a DataFrame with one row per (run, step, env, split) and the columns
``FRAME_COLUMNS``: ``method`` (a table row: DomainBed's algorithm or a linft method id),
``dataset``, ``test_envs`` (tuple of env names), ``trial`` (what is averaged), ``setting``
(the hyperparameter setting a selection method chooses over; DomainBed's hparams_seed),
``run``, ``step``, ``env`` (env name), ``split`` ("in"/"out") and ``acc`` (a fraction).

``collect_results(frame)`` reproduces ``domainbed/scripts/collect_results.py`` (DomainBed commit
b93c22a) exactly, quirks included:

* records (one per (run, step)) are grouped per (trial, dataset, method, test env); a run with
  test_envs (1, 2) belongs to the groups of test env 1 and of test env 2;
* inside a group, each setting's records are scored by the selection method's ``run_acc``
  (training-domain validation and the oracle look only at runs with a single test env;
  leave-one-domain-out also at the runs holding out the test env and one more env);
* the setting with the best val acc is chosen per trial; ties go to the LAST setting in
  ascending setting order (DomainBed sorts the groups, stable-sorts by val acc, then reverses);
  ties between steps go to the EARLIEST step (``max``); the oracle takes the last step;
* a cell is 100*mean over trials and 100*np.std(accs/sqrt(n)) (ddof=0), "X" without trials;
  the Avg column is the plain mean of the cell means, "X" if any cell is missing;
* the averages table averages, per trial, the chosen accs over that trial's test envs
  (whichever exist), then mean and standard error over trials.

A record is one (run, step); rows repeating a (run, step, env, split) keep the last acc (DomainBed
would count a step written twice as two records).  Record order matters only for exact ties between records of one setting (and for the last
bits of float sums); it is the frame's row order (DomainBed: file order).  Settings and trials
are ordered by a natural key (integers numerically, else as strings).

Numbers in the result frames are percentages (0-100), as DomainBed prints them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from linft.errors import LinftError

FRAME_COLUMNS = ("method", "dataset", "test_envs", "trial", "setting", "run", "step",
                 "env", "split", "acc")

# domainbed/datasets.py (order of DATASETS, ENVIRONMENTS of each class).
DOMAINBED_DATASETS = (
    "Debug28", "Debug224", "ColoredMNIST", "RotatedMNIST", "VLCS", "PACS", "OfficeHome",
    "TerraIncognita", "DomainNet", "SVIRO", "WILDSCamelyon", "WILDSFMoW",
    "SpawriousO2O_easy", "SpawriousO2O_medium", "SpawriousO2O_hard", "SpawriousM2M_easy",
    "SpawriousM2M_medium", "SpawriousM2M_hard")
DOMAINBED_ENVIRONMENTS: dict[str, tuple[str, ...]] = {
    "ColoredMNIST": ("+90%", "+80%", "-90%"),
    "RotatedMNIST": ("0", "15", "30", "45", "60", "75"),
    "VLCS": ("C", "L", "S", "V"),
    "PACS": ("A", "C", "P", "S"),
    "OfficeHome": ("A", "C", "P", "R"),
    "TerraIncognita": ("L100", "L38", "L43", "L46"),
    "DomainNet": ("clip", "info", "paint", "quick", "real", "sketch"),
}
# domainbed/algorithms.py ALGORITHMS: table rows come in this order, then the others as met.
DOMAINBED_ALGORITHMS = (
    "ERM", "ERMPlusPlus", "Fish", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD", "DANN",
    "CDANN", "MTL", "SagNet", "ARM", "VREx", "RSC", "SD", "ANDMask", "SANDMask", "IGA",
    "SelfReg", "Fishr", "TRM", "IB_ERM", "IB_IRM", "CAD", "CondCAD", "Transfer",
    "CausIRL_CORAL", "CausIRL_MMD", "EQRM", "RDM", "ADRMX", "URM")


@dataclass(frozen=True)
class _Record:
    """One checkpoint of one run; env indices follow the dataset's env order."""
    method: str
    dataset: str
    test_envs: tuple[int, ...]
    trial: object
    setting: object
    run: str
    step: int
    acc: Mapping[tuple[int, str], float]   # (env index, "in"/"out") -> accuracy


@dataclass(frozen=True)
class SelectionMethod:
    """``run_acc(records) -> {"val_acc", "test_acc"} | None`` scores one setting's records of
    one (trial, dataset, method, test env) group.  ``per_setting``: no choice across settings,
    every setting is its own table row."""
    name: str
    title: str
    run_acc: Callable[[list[_Record], int], "dict | None"]
    per_setting: bool = False
    domainbed: bool = True


def _n_envs(record: _Record) -> int:
    # DomainBed counts env{i}_out_acc keys from i = 0 until one is missing.
    n = 0
    while (n, "out") in record.acc:
        n += 1
    return n


def _single(records: list[_Record]) -> list[_Record]:
    return [r for r in records if len(r.test_envs) == 1]


def _iid_run_acc(records: list[_Record], test_env: int) -> dict | None:
    """IIDAccuracySelectionMethod: argmax over steps of mean(out acc of every env but the test
    env) -- every other env, as DomainBed's loop does; first maximum wins."""
    test_records = _single(records)
    if not test_records:
        return None
    steps = [{"val_acc": np.mean([r.acc[(i, "out")] for i in range(_n_envs(r)) if i != test_env]),
              "test_acc": r.acc[(test_env, "in")]} for r in test_records]
    return max(steps, key=lambda s: s["val_acc"])


def _oracle_run_acc(records: list[_Record], test_env: int) -> dict | None:
    """OracleSelectionMethod: the LAST checkpoint (no early stopping); val = test env's out acc."""
    test_records = _single(records)
    if not test_records:
        return None
    last = sorted(test_records, key=lambda r: r.step)[-1]
    return {"val_acc": last.acc[(test_env, "out")], "test_acc": last.acc[(test_env, "in")]}


def _loo_step_acc(records: list[_Record], test_env: int) -> dict | None:
    test_records = _single(records)
    if len(test_records) != 1:
        return None
    n_envs = _n_envs(records[0])
    val_accs = np.zeros(n_envs) - 1
    for r in records:
        if len(r.test_envs) == 2:
            val_env = (set(r.test_envs) - {test_env}).pop()
            val_accs[val_env] = r.acc[(val_env, "in")]
    val_accs = list(val_accs[:test_env]) + list(val_accs[test_env + 1:])
    if any(v == -1 for v in val_accs):
        return None
    return {"val_acc": np.sum(val_accs) / (n_envs - 1),
            "test_acc": test_records[0].acc[(test_env, "in")]}


def _loo_run_acc(records: list[_Record], test_env: int) -> dict | None:
    """LeaveOneOutSelectionMethod: per step, val = mean over the other envs v of the in acc of v
    in the run holding out (test env, v); steps missing any such run are skipped."""
    by_step: dict[int, list[_Record]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    accs = [a for a in (_loo_step_acc(by_step[s], test_env) for s in sorted(by_step)) if a is not None]
    return max(accs, key=lambda s: s["val_acc"]) if accs else None


SELECTION_METHODS: dict[str, SelectionMethod] = {m.name: m for m in (
    SelectionMethod("training_domain_validation", "training-domain validation set", _iid_run_acc),
    SelectionMethod("leave_one_domain_out", "leave-one-domain-out cross-validation", _loo_run_acc),
    SelectionMethod("test_domain_oracle", "test-domain validation set (oracle)", _oracle_run_acc),
    SelectionMethod("zb_no_selection",
                    "[ZB] protocol: no hyperparameter selection, step by training-domain validation",
                    _iid_run_acc, per_setting=True, domainbed=False),
)}
DOMAINBED_SELECTIONS = ("training_domain_validation", "leave_one_domain_out", "test_domain_oracle")


def natural_key(x):
    """Integers (and integer strings) numerically, before everything else as strings."""
    s = str(x)
    try:
        return (0, int(s), "")
    except ValueError:
        return (1, 0, s)


def _nan_low(v):
    return float("-inf") if isinstance(v, (float, np.floating)) and np.isnan(v) else v


def _sweep_accs(method: SelectionMethod, records: list[_Record], test_env: int) -> dict:
    """{row key: test acc} for one (trial, dataset, method, test env) group.  DomainBed's
    SelectionMethod.sweep_acc: settings sorted, stable sort by val acc, reversed, first."""
    by_setting: dict[object, list[_Record]] = {}
    for r in records:
        by_setting.setdefault(r.setting, []).append(r)
    scored = [(s, method.run_acc(by_setting[s], test_env)) for s in sorted(by_setting, key=natural_key)]
    scored = [(s, a) for s, a in scored if a is not None]
    if method.per_setting:
        return {s: a["test_acc"] for s, a in scored}
    if not scored:
        return {}
    best = sorted(scored, key=lambda sa: _nan_low(sa[1]["val_acc"]))[::-1][0]
    return {None: best[1]["test_acc"]}


def format_mean(data: Sequence[float]) -> tuple[float, float, int]:
    """DomainBed's format_mean numbers: (100*mean, 100*np.std(data/sqrt(n)), n); NaN if empty."""
    if len(data) == 0:
        return math.nan, math.nan, 0
    mean = 100 * np.mean(list(data))
    err = 100 * np.std(list(data) / np.sqrt(len(data)))
    return float(mean), float(err), len(data)


@dataclass(frozen=True)
class SelectionResults:
    """``cells``: one row per (selection, table row, dataset, test env) plus test_env="Avg" rows;
    ``averages``: one row per (selection, table row, dataset) plus dataset="Avg" rows.
    Columns selection, method, setting (None unless zb_no_selection), row (the printed label),
    dataset, [test_env], mean, se (percent; se NaN on Avg rows), n (trials; on Avg rows the
    smallest n of the averaged cells, 0 if one is missing -> printed "X").  Rows are in table
    order."""
    cells: pd.DataFrame
    averages: pd.DataFrame
    envs: Mapping[str, tuple[str, ...]]
    n_records: int


def env_orders(frame: pd.DataFrame, envs: Mapping[str, Sequence[str]] | None = None) -> dict:
    """dataset -> env names in order: ``envs``, else frame.attrs["envs"], else DomainBed's
    ENVIRONMENTS, else the order in which the frame first names them."""
    given = dict(envs if envs is not None else frame.attrs.get("envs", {}) or {})
    out = {}
    for dataset, sub in frame.groupby("dataset", sort=False):
        order = given.get(dataset) or DOMAINBED_ENVIRONMENTS.get(dataset)
        if order is None:
            seen = list(dict.fromkeys(list(sub["env"]) + [e for t in sub["test_envs"] for e in t]))
            order = seen
        unknown = set(sub["env"]) - set(order)
        if unknown:
            raise LinftError(f"dataset {dataset}: envs {sorted(map(str, unknown))} are not in its "
                             f"env order {list(order)}")
        out[dataset] = tuple(order)
    return out


def _records(frame: pd.DataFrame, envs: Mapping[str, tuple[str, ...]]) -> list[_Record]:
    bad = set(frame["split"]) - {"in", "out"}
    if bad:
        raise LinftError(f"checkpoint frame: split must be 'in' or 'out', got {sorted(map(str, bad))}")
    meta_cols = ["method", "dataset", "test_envs", "trial", "setting"]
    f = frame[["run", "step", "env", "split", "acc"] + meta_cols]
    records = []
    for (run, step), g in f.groupby(["run", "step"], sort=False):
        first = g.iloc[0]
        for c in meta_cols:
            if len({str(v) for v in g[c]}) > 1:
                raise LinftError(f"checkpoint frame: run {run} step {step} has several {c} values")
        order = envs[first["dataset"]]
        index = {e: i for i, e in enumerate(order)}
        try:
            test_envs = tuple(index[e] for e in first["test_envs"])
        except KeyError as e:
            raise LinftError(f"run {run}: test env {e} is not one of {list(order)}") from None
        acc = {(index[e], s): float(a) for e, s, a in zip(g["env"], g["split"], g["acc"])}
        records.append(_Record(first["method"], first["dataset"], test_envs, first["trial"],
                               first["setting"], str(run), int(step), acc))
    return records


def _row_order(records: list[_Record], per_setting: bool) -> list[tuple]:
    seen = list(dict.fromkeys(r.method for r in records))
    methods = [m for m in DOMAINBED_ALGORITHMS if m in seen] + [m for m in seen if m not in DOMAINBED_ALGORITHMS]
    if not per_setting:
        return [(m, None) for m in methods]
    settings = {m: sorted({r.setting for r in records if r.method == m}, key=natural_key) for m in methods}
    return [(m, s) for m in methods for s in settings[m]]


def _dataset_order(datasets) -> list[str]:
    # DomainBed keeps only the datasets of its registry, in registry order; others follow, sorted.
    return [d for d in DOMAINBED_DATASETS if d in datasets] + sorted(d for d in datasets if d not in DOMAINBED_DATASETS)


def row_label(method: str, setting) -> str:
    return method if setting is None else f"{method} [{setting}]"


def _avg(means: list[float]) -> float:
    return math.nan if any(math.isnan(m) for m in means) else sum(means) / len(means)


def collect_results(frame: pd.DataFrame, selections: Sequence[str] = DOMAINBED_SELECTIONS,
                    envs: Mapping[str, Sequence[str]] | None = None) -> SelectionResults:
    """Run each named selection method of SELECTION_METHODS over a checkpoint frame."""
    missing = [c for c in FRAME_COLUMNS if c not in frame.columns]
    if missing:
        raise LinftError(f"checkpoint frame lacks columns {missing} (needs {list(FRAME_COLUMNS)})")
    if len(frame) == 0:
        raise LinftError("checkpoint frame is empty: no results to select from")
    unknown = [s for s in selections if s not in SELECTION_METHODS]
    if unknown:
        raise LinftError(f"unknown selection method(s) {unknown}; known: {list(SELECTION_METHODS)}")
    orders = env_orders(frame, envs)
    records = _records(frame, orders)
    groups: dict[tuple, list[_Record]] = {}   # DomainBed's get_grouped_records, insertion order
    for r in records:
        for e in r.test_envs:
            groups.setdefault((r.trial, r.dataset, r.method, e), []).append(r)
    datasets = _dataset_order({r.dataset for r in records})
    cells, avgs = [], []
    for name in selections:
        method = SELECTION_METHODS[name]
        swept = []   # (trial, dataset, method, setting, test env, acc)
        for (trial, dataset, m, e), recs in groups.items():
            for s, a in _sweep_accs(method, recs, e).items():
                swept.append((trial, dataset, m, s, e, a))
        for m, s in _row_order(records, method.per_setting):
            base = {"selection": name, "method": m, "setting": s, "row": row_label(m, s)}
            mine = [x for x in swept if x[2] == m and x[3] == s]
            dataset_means, dataset_ns = [], []
            for dataset in datasets:
                means, ns = [], []
                for j, env in enumerate(orders[dataset]):
                    mean, se, n = format_mean([x[5] for x in mine if x[1] == dataset and x[4] == j])
                    cells.append({**base, "dataset": dataset, "test_env": env, "mean": mean, "se": se, "n": n})
                    means.append(mean), ns.append(n)
                cells.append({**base, "dataset": dataset, "test_env": "Avg", "mean": _avg(means),
                              "se": math.nan, "n": min(ns)})
                per_trial: dict[object, list[float]] = {}
                for x in mine:
                    if x[1] == dataset:
                        per_trial.setdefault(x[0], []).append(x[5])
                trial_means = [float(np.mean(per_trial[t])) for t in sorted(per_trial, key=natural_key)]
                mean, se, n = format_mean(trial_means)
                avgs.append({**base, "dataset": dataset, "mean": mean, "se": se, "n": n})
                dataset_means.append(mean), dataset_ns.append(n)
            avgs.append({**base, "dataset": "Avg", "mean": _avg(dataset_means), "se": math.nan,
                         "n": min(dataset_ns)})
    cell_cols = ["selection", "method", "setting", "row", "dataset", "test_env", "mean", "se", "n"]
    return SelectionResults(
        cells=pd.DataFrame(cells, columns=cell_cols).astype({"n": int}),
        averages=pd.DataFrame(avgs, columns=[c for c in cell_cols if c != "test_env"]).astype({"n": int}),
        envs=orders, n_records=len(records))
