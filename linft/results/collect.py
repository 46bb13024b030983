"""Run folders -> one long tidy DataFrame (config joined at load time), per-run selections and
[ZB]'s hyperparameter clouds.  The accuracy tables (DomainBed's model selection, intervals over
seeds only) are built in linft.results.selection_frames and linft.results.report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from linft.runs.config import RunConfig

CONFIG_COLUMNS = ("dataset", "backbone", "mode", "k", "p", "head_init", "lr", "weight_decay", "steps",
                  "last_layer_lr_mult", "n_per_domain", "seed", "trial_seed", "resolution", "augment")


def run_folders(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def load_rows(root: str | Path, analyses: bool = True) -> pd.DataFrame:
    """Every row of every run under ``root`` (results.jsonl, and analyses/*/rows.jsonl when
    ``analyses``), with the run's config fields as columns and ``state`` (done/failed/running)."""
    from linft.runs.store import run_state
    frames = []
    for folder in run_folders(root):
        cfg = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
        files = [folder / "results.jsonl"]
        if analyses:
            files += sorted((folder / "analyses").glob("*/rows.jsonl"))
        rows = []
        for f in files:
            if f.exists():
                for line in f.read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        if not rows:
            continue
        df = pd.DataFrame(rows)
        df["run"] = folder.name
        df["state"] = run_state(folder)
        df["test_env"] = ",".join(cfg.test_envs) or "#0"
        for c in CONFIG_COLUMNS:
            df[c] = getattr(cfg, c)
        frames.append(df)
    # rows of operations on several runs: size trends and soups
    for f in sorted(Path(root).glob("_trends/*/rows.jsonl")) + sorted(Path(root).glob("_soups/*/rows.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            extra = pd.DataFrame(rows)
            first = next((fr for fr in frames if fr["run"].iloc[0] == extra["run"].iloc[0]), None)
            ref = first if first is not None else (frames[0] if frames else None)
            if ref is not None:  # config columns of a member run (dataset, backbone, seed)
                for c in ("dataset", "backbone", "test_env", "seed"):
                    extra[c] = ref[c].iloc[0]
            extra["state"] = "done"
            frames.append(extra)
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


SUMMARY_METRICS = {
    "distance": ("relative", "distance", "delta_cosine"),
    "interp": ("loss_barrier", "error_barrier"),
    "linearity": ("rel_err_l2", "agreement", "halving_ratio_l2", "acc_gap"),
    "ntk": ("kernel_distance",),
    "identity": ("midpoint_gap_rel", "loss_barrier"),
}


def analysis_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Headline numbers of the linearity analyses: pooled over domains (i.i.d. = training domains'
    held-out split, o.o.d. = test domains), totals for distances, t = 1 for Taylor fidelity."""
    if "kind" not in df:
        return pd.DataFrame()
    labels = {r: f"{m} p={p:g}" + (f" n={n}" if df["n_per_domain"].nunique() > 1 else "")
              for r, m, p, n in df.drop_duplicates("run")[["run", "mode", "p", "n_per_domain"]].itertuples(index=False)}
    keep = pd.Series(False, index=df.index)
    for kind, metrics in SUMMARY_METRICS.items():
        keep |= (df["kind"] == kind) & df["metric"].isin(metrics)
    part = df[keep].copy()
    for col in ("env", "level", "t", "definition", "endpoint_a", "endpoint_b", "role"):
        if col not in part:
            part[col] = None
    part = part[(part["env"].isna() | (part["env"] == "pooled")) & (part["level"].isna() | (part["level"] == "total"))
                & (part["t"].isna() | (part["t"] == 1.0))]
    if part.empty:
        return pd.DataFrame()

    def name(ep):
        kind, _, run = str(ep).partition(":")
        return labels.get(run, run) if run else str(ep)

    part["runs"] = [f"{name(a)} -> {name(b)}" if isinstance(a, str) and isinstance(b, str) else labels.get(r, r)
                    for a, b, r in zip(part["endpoint_a"], part["endpoint_b"], part["run"])]
    part["data"] = part["role"].map({"train": "i.i.d.", "test": "o.o.d."}).fillna("-")
    part["definition"] = part["definition"].fillna("")
    table = part.pivot_table(index=["kind", "runs", "metric", "definition"], columns="data", values="value",
                             aggfunc="mean").reset_index()
    return table.round(4)


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
