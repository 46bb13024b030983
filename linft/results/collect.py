"""Run folders -> one long tidy DataFrame (config joined at load time), per-run selections and
[ZB]'s hyperparameter clouds.  The accuracy tables (DomainBed's model selection, intervals over
seeds only) are built in linft.results.selection_frames and linft.results.report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from linft.errors import LinftError
from linft.runs.config import RunConfig

CONFIG_COLUMNS = ("dataset", "backbone", "mode", "k", "p", "head_init", "lr", "weight_decay", "steps",
                  "last_layer_lr_mult", "n_per_domain", "seed", "trial_seed", "resolution", "augment",
                  "batch_size")


def run_folders(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def _config_columns(cfg: RunConfig) -> dict:
    return {"test_env": ",".join(cfg.test_envs) or "#0", **{c: getattr(cfg, c) for c in CONFIG_COLUMNS}}


def _read_config(folder: Path) -> RunConfig | None:
    """A member run's config, or None when it is missing or unreadable (its fields are then unknown)."""
    from linft.runs.store import read_run_config
    try:
        return read_run_config(folder)
    except LinftError:
        return None


def _child_frame(child: Path, host: Path, host_columns: dict) -> pd.DataFrame | None:
    """Rows of one analysis folder of ``host``, with the config columns of ``host`` except the
    fields in which the member runs differ (empty: no single value describes the rows); a row's own
    value of such a field (a trend row's ``mode``, ``n_per_domain``) is kept. ``member_runs``: the
    runs the analysis read, comma-separated."""
    from linft.runs.store import ChildDir, read_jsonl
    rows = read_jsonl(child / "rows.jsonl")
    if not rows:
        return None
    df = pd.DataFrame(rows)
    try:
        members = [str(m) for m in ChildDir(child).read_config().get("runs", [host.name])]
    except (OSError, ValueError):
        members = [host.name]
    columns = dict(host_columns)
    others = [_read_config(host.parent / m) for m in members if m != host.name]
    for cfg in others:
        theirs = _config_columns(cfg) if cfg is not None else {}
        for c in list(columns):
            if cfg is None or theirs[c] != columns[c]:
                columns[c] = np.nan
    for c, v in columns.items():
        if c in df:
            df[c] = df[c].where(df[c].notna(), v)
        else:
            df[c] = [v] * len(df) if isinstance(v, tuple) else v
    df["member_runs"] = ",".join(members)
    if "run" not in df:
        df["run"] = host.name
    df["run"] = df["run"].fillna(host.name)
    return df


def load_rows(root: str | Path, analyses: bool = True) -> pd.DataFrame:
    """Every row of every run under ``root`` (results.jsonl, and the analysis folders
    analyses/*/rows.jsonl -- analyses, size trends, soups -- when ``analyses``), with the run's
    config fields as columns and ``state`` (done/failed/running). Rows of an analysis of several
    runs get the config of the run they live under, except the fields the members differ in."""
    from linft.runs.store import read_jsonl, read_run_config, run_state
    frames = []
    for folder in run_folders(root):
        cfg = read_run_config(folder)  # refuses a config.json edited by hand (its run id is not the folder's)
        state, columns = run_state(folder), _config_columns(cfg)
        rows = read_jsonl(folder / "results.jsonl") if (folder / "results.jsonl").exists() else []
        if rows:
            df = pd.DataFrame(rows)
            df["run"] = folder.name
            for c, v in columns.items():
                df[c] = [v] * len(df) if isinstance(v, tuple) else v
            df["state"] = state
            frames.append(df)
        if analyses:
            for child in sorted((folder / "analyses").glob("*/rows.jsonl")):
                df = _child_frame(child.parent, folder, columns)
                if df is not None:
                    df["state"] = state
                    frames.append(df)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")  # "nan"/"inf" strings from diverged runs
    return out


def method_name(mode: str, p: float, model: str = "current") -> str:
    suffix = {"current": "", "traj_avg": " + traj. avg", "traj_ens": " + traj. ens"}[model]
    return f"{mode} p={p:g}{suffix}"


def selected_accuracy(df: pd.DataFrame, selection: str = "train_val") -> pd.DataFrame:
    """One row per (run, model): o.o.d. accuracy (test domains' "in" split) and i.i.d. accuracy
    (training domains' "out" split, averaged) at the step chosen by ``selection``."""
    sel = df[(df["kind"] == "select") & (df["selection"] == selection) & (df["metric"] == "acc")
             & (df["state"] == "done")]
    if sel.empty:
        return pd.DataFrame()
    keys = ["run", "model", "dataset", "backbone", "mode", "p", "seed", "trial_seed", "test_env", "lr",
            "weight_decay", "last_layer_lr_mult", "n_per_domain", "step"]
    ood = sel[(sel["role"] == "test") & (sel["split"] == "in")].groupby(keys)["value"].mean().rename("ood_acc")
    iid = sel[(sel["role"] == "train") & (sel["split"] == "out")].groupby(keys)["value"].mean().rename("iid_acc")
    out = pd.concat([ood, iid], axis=1).reset_index()
    out["method"] = [method_name(m, p, mo) for m, p, mo in zip(out["mode"], out["p"], out["model"])]
    if out["n_per_domain"].nunique() > 1:  # runs of several sizes are different methods, not seeds
        out["method"] += [f" n={n or 'all'}" for n in out["n_per_domain"]]
    out["selection"] = selection
    return out


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _run_labels(df: pd.DataFrame) -> dict[str, str]:
    """run id -> "mode p=..", from the runs' own rows (not those of analyses of several runs)."""
    own = df[df["analysis"].isna()] if "analysis" in df else df
    own = own if not own.empty else df
    sizes = own["n_per_domain"].nunique() > 1
    return {r: f"{m} p={p:g}" + (f" n={n}" if sizes else "")
            for r, m, p, n in own.drop_duplicates("run")[["run", "mode", "p", "n_per_domain"]].itertuples(index=False)
            if isinstance(m, str)}


def analysis_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers of the registered analyses (each declares its ``summary`` metrics and which
    rows are headline ones: by default pooled over domains -- i.i.d. = training domains' held-out
    split, o.o.d. = test domains --, totals for distances, t = 1 for Taylor fidelity). ``variant``
    names what the analysis's ``label`` fields say (barrier definition, kernel form, soup model)."""
    from linft.analysis.registry import analyses
    if "kind" not in df:
        return pd.DataFrame()
    labels = _run_labels(df)
    parts = []
    for a in analyses():
        if not a.summary:
            continue
        part = df[(df["kind"] == a.kind) & df["metric"].isin(a.summary)].dropna(axis=1, how="all")
        if part.empty:
            continue
        records = [{k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}
                   for r in part.to_dict("records")]
        keep = [a.is_headline(r) for r in records]
        part = part[keep].copy()
        if part.empty:
            continue
        variant = [" ".join(str(r[k]) if k == "definition" else f"{k}={r[k]}" for k in a.label if k in r)
                   for r, k_ in zip(records, keep) if k_]
        part["variant"] = variant
        parts.append(part)
    if not parts:
        return pd.DataFrame()
    part = pd.concat(parts, ignore_index=True)
    for col in ("endpoint_a", "endpoint_b", "role", "member_runs"):
        if col not in part:
            part[col] = None

    def name(ep):
        kind, _, run = str(ep).partition(":")
        return labels.get(run, run) if run else str(ep)

    def runs(a, b, r, members):
        if isinstance(a, str) and isinstance(b, str):
            return f"{name(a)} -> {name(b)}"
        if isinstance(members, str) and "," in members:
            return " + ".join(labels.get(m, m) for m in members.split(","))
        return labels.get(r, r)

    part["runs"] = [runs(*x) for x in zip(part["endpoint_a"], part["endpoint_b"], part["run"], part["member_runs"])]
    part["data"] = part["role"].map({"train": "i.i.d.", "test": "o.o.d."}).fillna("-")
    table = part.pivot_table(index=["kind", "runs", "metric", "variant"], columns="data", values="value",
                             aggfunc="mean").reset_index()
    return table.round(4)


def analysis_notes(kinds=None) -> list[str]:
    """What each registered analysis's summary rows mean (the report's text); ``kinds``: only these."""
    from linft.analysis.registry import analyses
    return [a.doc or f"{a.kind}: {a.help}." for a in analyses() if a.summary and (kinds is None or a.kind in set(kinds))]


def hparam_clouds(acc: pd.DataFrame, max_points: int = 20_000, seed: int = 0,
                  settings: tuple[str, ...] = ("lr", "weight_decay")) -> pd.DataFrame:
    """[ZB]'s clouds: hyperparameters are not selected; every way of choosing one (lr, weight decay)
    setting per test domain gives one point (i.i.d. and o.o.d. accuracy averaged over the test
    domains, each setting first averaged over seeds; ``settings``: the columns that make a
    setting). (2 x 3)^4 = 1296 points per method on a
    4-domain dataset; beyond ``max_points`` combinations a seeded random subset is drawn."""
    import itertools
    out = []
    rng = np.random.default_rng(seed)
    for (dataset, method), part in acc.groupby(["dataset", "method"]):
        cell = part.groupby(["test_env", *settings])[["iid_acc", "ood_acc"]].mean()
        envs = sorted(cell.index.get_level_values(0).unique())
        options = [cell.loc[e].to_numpy() for e in envs]  # per env: [settings, 2]
        total = int(np.prod([len(o) for o in options]))
        if total <= max_points:
            combos = itertools.product(*[range(len(o)) for o in options])
        else:
            combos = (tuple(rng.integers(len(o)) for o in options) for _ in range(max_points))
        for combo in combos:
            pts = np.stack([options[i][j] for i, j in enumerate(combo)])
            out.append((dataset, method, *pts.mean(0)))
    return pd.DataFrame(out, columns=["dataset", "method", "iid_acc", "ood_acc"])
