"""linft runs -> DomainBed checkpoint frames (see linft.results.model_selection), and the tables
built on them.

What is what, for a linft sweep (DomainBed's names in brackets):

* **method** (a table row) [algorithm] = every semantic config field that differs between the runs
  of one dataset, except the averaged fields (``AVERAGED_FIELDS``), the fields a selection
  method chooses over (``HPARAM_FIELDS``) and the table's own columns (dataset, test envs);
  plus the evaluated model: ``current``, ``traj_avg`` and ``traj_ens`` are different methods.
  So ``last_layer_lr_mult = [1, 10]`` gives two rows, never one pooled row.
* **setting** [hparams_seed] = the tuple of ``HPARAM_FIELDS`` values.  DomainBed's selection
  methods pick one setting per trial and test env; ``zb_no_selection`` ([ZB]'s protocol) keeps
  every setting as its own row.
* **trial** [trial_seed] = the pair (trial_seed, seed): the only thing ever averaged.  Cells are
  mean +- standard error over trials, n stated in every caption.

``HPARAM_FIELDS`` is (lr, weight_decay): the grid that [ZB] Sec. 4 and DomainBed's random search
tune.  Fields that experiments *compare* (last-layer lr multiplier, head init, k, p, steps, ...)
are method identity; pass ``hparams=`` to select over more fields on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from linft.errors import LinftError
from linft.results.model_selection import (DOMAINBED_SELECTIONS, FRAME_COLUMNS, SelectionResults,
                                           collect_results)
from linft.runs.config import RunConfig, environment_names

HPARAM_FIELDS: tuple[str, ...] = ("lr", "weight_decay")
AVERAGED_FIELDS: tuple[str, ...] = ("seed", "trial_seed")
COLUMN_FIELDS: tuple[str, ...] = ("dataset", "test_envs")
MODELS = ("current", "traj_avg", "traj_ens")
MODEL_SUFFIX = {"current": "", "traj_avg": " + traj. avg", "traj_ens": " + traj. ens"}
# method families (the mode) in the order tables and legends use
FAMILY_ORDER = ("full", "tail", "linear", "unfolded", "probe", "scratch")
SELECTIONS = (*DOMAINBED_SELECTIONS, "zb_no_selection")
LEGACY_SELECTIONS = {"train_val": "training_domain_validation", "oracle": "test_domain_oracle"}


def _semantic_fields() -> list[str]:
    return [f.name for f in fields(RunConfig) if f.metadata.get("semantic", True)]


def _value(v):
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v


def run_table(root: str | Path) -> pd.DataFrame:
    """One row per run folder under ``root``: ``run``, ``state`` and every semantic config field
    (canonical: backbone full names, test envs as names; tuples stay tuples)."""
    from linft.runs.store import read_run_config, run_state
    root = Path(root)
    if not root.is_dir():
        raise LinftError(f"{str(root)!r} is not a folder (expected a linft runs root)")
    rows = []
    for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        try:
            cfg = read_run_config(folder)
        except LinftError as e:
            raise LinftError(f"{folder}/config.json is not a linft run config ({e})") from None
        rows.append({"run": folder.name, "state": run_state(folder),
                     **{f: getattr(cfg, f) for f in _semantic_fields()}})
    if not rows:
        hint = ""
        if any((p / "results.jsonl").is_file() and not (p / "config.json").exists() for p in root.iterdir()
               if p.is_dir()):
            hint = "; it looks like a DomainBed sweep folder: use --domainbed DIR"
        raise LinftError(f"no linft runs under {str(root)!r} (no subfolder holds a config.json){hint}")
    return pd.DataFrame(rows)


def finished(runs: pd.DataFrame, root="") -> pd.DataFrame:
    """The done runs; none done is an error saying how many runs are in which state."""
    done = runs[runs["state"] == "done"]
    if done.empty:
        states = ", ".join(f"{k} {v}" for k, v in runs["state"].value_counts().items())
        raise LinftError(f"no finished run under {str(root)!r} ({states}): nothing to tabulate yet; "
                         f"see `linft sweep status`")
    return done


@dataclass(frozen=True)
class Identity:
    """How runs map to (method, setting, trial); ``method_fields[label]`` = the label's fields."""
    identity: tuple[str, ...]           # config fields that make the method (besides mode, p)
    hparams: tuple[str, ...]            # the setting's fields that actually vary
    labels: pd.DataFrame                # run, method, family, setting, trial, + identity fields


def identify(runs: pd.DataFrame, hparams: Sequence[str] = HPARAM_FIELDS) -> Identity:
    """Method, setting and trial of each run (see the module docstring)."""
    sem = [f for f in _semantic_fields() if f in runs]
    bad = [h for h in hparams if h not in sem]
    if bad:
        raise LinftError(f"hyperparameter field(s) {bad} are not semantic config fields; choose from {sem}")
    skip = set(hparams) | set(AVERAGED_FIELDS) | set(COLUMN_FIELDS) | {"mode", "p"}
    text = runs[sem].map(lambda v: repr(_value(v)))

    def varies(f):
        return bool((text.groupby(runs["dataset"])[f].nunique() > 1).any())

    identity = tuple(f for f in sem if f not in skip and varies(f))
    varying_h = tuple(h for h in hparams if varies(h))
    out = runs[["run", "dataset", "test_envs", "mode", "p", *identity, *hparams, *AVERAGED_FIELDS]].copy()

    def label(r):
        extra = [f"n={r[f] or 'all'}" if f == "n_per_domain" else f"{f}={_fmt(r[f])}" for f in identity]
        return " ".join([f"{r['mode']} p={r['p']:g}", *extra])
    out["method"] = [label(r) for _, r in out.iterrows()]
    out["family"] = out["mode"]
    out["setting"] = [", ".join(f"{h}={_fmt(r[h])}" for h in varying_h) or "-" for _, r in out.iterrows()]
    out["trial"] = [f"trial_seed={t} seed={s}" for t, s in zip(out["trial_seed"], out["seed"])]
    return Identity(identity, varying_h, out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(_value(v))


def family_key(method: str):
    """Sort key: method family (FAMILY_ORDER), then p, then the model (current, traj_avg,
    traj_ens), then the label."""
    mode = method.split(" ", 1)[0]
    fam = FAMILY_ORDER.index(mode) if mode in FAMILY_ORDER else len(FAMILY_ORDER)
    model = next((i for i, m in enumerate(MODELS[1:], 1) if method.endswith(MODEL_SUFFIX[m])), 0)
    p = method.split(" p=", 1)[1].split(" ", 1)[0] if " p=" in method else "0"
    try:
        pv = float(p)
    except ValueError:
        pv = 0.0
    return (fam, pv, model, method)


def checkpoint_frame(rows: pd.DataFrame, ident: Identity, models: Sequence[str] = ("current",)) -> pd.DataFrame:
    """The checkpoint frame of the done runs' eval rows (kind=eval, metric=acc, split in/out) of
    ``models``: one frame, one method per (identity, model); ``run`` is "<run id>:<model>".
    Rows are ordered by method family so that tables come out in that order."""
    need = {"kind", "metric", "model", "env", "split", "step", "value", "run"}
    if rows.empty or not need <= set(rows.columns):
        raise LinftError("no evaluation rows (kind=eval) in the finished runs")
    ev = rows[(rows["kind"] == "eval") & (rows["metric"] == "acc") & rows["split"].isin(["in", "out"])
              & rows["model"].isin(list(models))]
    ev = ev[ev["run"].isin(set(ident.labels["run"]))]
    if ev.empty:
        raise LinftError(f"no accuracy evaluations of model(s) {list(models)} in the finished runs")
    lab = ident.labels.set_index("run")
    f = pd.DataFrame({
        "method": [lab.at[r, "method"] + MODEL_SUFFIX.get(m, f" + {m}") for r, m in zip(ev["run"], ev["model"])],
        "dataset": ev["run"].map(lab["dataset"]).to_numpy(),
        "test_envs": ev["run"].map(lab["test_envs"]).to_numpy(),
        "trial": ev["run"].map(lab["trial"]).to_numpy(),
        "setting": ev["run"].map(lab["setting"]).to_numpy(),
        "run": (ev["run"] + ":" + ev["model"]).to_numpy(),
        "step": ev["step"].astype(int).to_numpy(),
        "env": ev["env"].to_numpy(), "split": ev["split"].to_numpy(),
        "acc": pd.to_numeric(ev["value"], errors="coerce").to_numpy()})
    order = sorted(f["method"].unique(), key=family_key)
    f["_o"] = f["method"].map({m: i for i, m in enumerate(order)})
    f = f.sort_values(["_o", "run", "step"], kind="stable").drop(columns="_o").reset_index(drop=True)
    f.attrs["envs"] = {d: environment_names(d) for d in f["dataset"].unique() if environment_names(d)}
    return f[list(FRAME_COLUMNS)]


def iid_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with, in every single-test-env record, the test env's "in" accuracy replaced by
    the i.i.d. accuracy (mean "out" accuracy of the other envs).  Every selection method chooses
    from the "out" splits (and LOO from two-test-env records, left as they are), so
    collect_results on it reports the i.i.d. accuracy of exactly the checkpoints it chose."""
    f = frame.copy()
    single = f["test_envs"].map(len) == 1
    test = f["test_envs"].map(lambda t: t[0] if len(t) == 1 else None)
    other_out = f[single & (f["split"] == "out") & (f["env"] != test)]
    iid = other_out.groupby(["run", "step"], sort=False)["acc"].mean()
    target = single & (f["split"] == "in") & (f["env"] == test)
    keys = pd.MultiIndex.from_arrays([f.loc[target, "run"], f.loc[target, "step"]])
    f.loc[target, "acc"] = iid.reindex(keys).to_numpy()
    f.attrs = dict(frame.attrs)
    return f


@dataclass(frozen=True)
class Tables:
    """o.o.d. and i.i.d. SelectionResults of the same selections on the same frame."""
    ood: SelectionResults
    iid: SelectionResults
    frame: pd.DataFrame


def select(frame: pd.DataFrame, selections: Sequence[str] = SELECTIONS) -> Tables:
    selections = [LEGACY_SELECTIONS.get(s, s) for s in selections]
    return Tables(collect_results(frame, selections), collect_results(iid_frame(frame), selections), frame)


def summary(tables: Tables) -> pd.DataFrame:
    """Short table, one row per method sorted by family: each DomainBed selection's o.o.d. (and
    i.i.d.) accuracy averaged over datasets ("Avg" of the averages table; the dataset itself
    when there is one), as "mean ± se (n)"."""
    def cell(r):
        if r.n == 0 or np.isnan(r.mean):
            return "X"
        return f"{r.mean:.1f}" + ("" if np.isnan(r.se) else f" ± {r.se:.1f}") + f" (n={r.n})"
    a = tables.ood.averages
    one = a["dataset"].nunique() == 2  # a dataset and "Avg"
    out = {}
    for what, res in (("o.o.d.", tables.ood), ("i.i.d.", tables.iid)):
        av = res.averages
        av = av[(av["dataset"] != "Avg") if one else (av["dataset"] == "Avg")]
        for sel in [s for s in dict.fromkeys(av["selection"]) if s in DOMAINBED_SELECTIONS]:
            for r in av[av["selection"] == sel].itertuples():
                out.setdefault(r.method, {})[f"{what} {sel.replace('_', ' ')}"] = cell(r)
    c = tables.ood.cells
    c = c[(c["selection"] == "training_domain_validation") & (c["test_env"] != "Avg") & (c["n"] > 0)]
    for m, g in c.groupby("method"):
        covered = [f"{d}: {','.join(g2['test_env'])}" for d, g2 in g.groupby("dataset", sort=False)]
        out.setdefault(m, {})["test envs with trials"] = "; ".join(covered)
    df = pd.DataFrame.from_dict(out, orient="index")
    df = df.loc[sorted(df.index, key=family_key)]
    df.index.name = "method"
    return df.reset_index()


def per_setting_points(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run (single test env): the step chosen by training-domain validation (first maximum of
    the mean "out" accuracy of the other envs, as DomainBed), its i.i.d. and o.o.d. accuracy
    (fractions).  Columns method, dataset, test_env, setting, trial, run, step, iid_acc, ood_acc."""
    f = frame[frame["test_envs"].map(len) == 1]
    out = []
    for run, g in f.groupby("run", sort=False):
        t = g["test_envs"].iloc[0][0]
        val = g[(g["split"] == "out") & (g["env"] != t)].groupby("step")["acc"].mean()
        test = g[(g["split"] == "in") & (g["env"] == t)].groupby("step")["acc"].last()
        steps = [s for s in val.index if s in test.index]
        if not steps:
            continue
        best = max(steps, key=lambda s: val[s])
        first = g.iloc[0]
        out.append((first["method"], first["dataset"], t, first["setting"], first["trial"], run, best,
                    float(val[best]), float(test[best])))
    return pd.DataFrame(out, columns=["method", "dataset", "test_env", "setting", "trial", "run", "step",
                                      "iid_acc", "ood_acc"])


def seed_mean(points: pd.DataFrame, keys: Sequence[str], cols=("iid_acc", "ood_acc")) -> pd.DataFrame:
    """Mean and standard error (np.std ddof=0 / sqrt(n), as the tables) over the trials of each
    ``keys`` group, in percent; n = number of trials.  Only trials are averaged: ``keys`` must
    name everything else that tells runs apart."""
    def agg(g):
        d = {}
        for c in cols:
            v = 100 * g[c].to_numpy(dtype=float)
            d[c] = v.mean()
            d[c + "_se"] = v.std() / np.sqrt(len(v))
        d["n"] = len(g)
        return pd.Series(d)
    per_trial = points.groupby([*keys, "trial"], sort=False)[list(cols)].mean().reset_index()
    return per_trial.groupby(list(keys), sort=False).apply(agg, include_groups=False).reset_index()
