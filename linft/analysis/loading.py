"""Analyses of finished runs, each a hashed child folder of the run it reads (DESIGN.md):

    <run>/analyses/<kind>-<sha256[:12]>/{config.json, rows.jsonl, done}

The id hashes the run ids (in order: for two runs, the folder lives under the first) and the
analysis options that change numbers; a folder with its ``done`` marker is read back, never
recomputed. Rows follow the results.jsonl contract (``run``, ``kind``, ``alpha``/``t``/``step``,
``env``, ``role``, ``split``, ``metric``, ``value`` + keys such as ``layer``, ``endpoint_a``,
``endpoint_b``, ``bn_policy``, ``definition``).

Kinds: ``distance`` (here), ``interp`` / ``funcinterp`` / ``identity`` (:mod:`linft.analysis.paths`),
``linearity`` / ``ntk`` / ``trend`` (:mod:`linft.analysis.fidelity`).

How a run is read (:func:`load_run`): its config rebuilds the pipeline (deterministic given the
seed), which gives theta0 -- the pre-trained weights and the new head at its initialisation
(torch's default Linear init seeded by the run's seed; for ``head_init="probe"`` the linear probe
is re-run exactly as the run did, same seed and batches). ``final.pt`` then gives theta_ft (or the
trajectory average). A linearized run stores theta0 itself, which is used as is. Nothing in the run
folder is modified; the models read are never mutated (parameters are swapped in with
``torch.func.functional_call``). Splits: "i.i.d." = the training domains' ``out`` split, "o.o.d."
= the test domains (``in`` and ``out``); rows come per (env, split) and pooled
(``env="pooled"``: role train/split out, role test/split all). BatchNorm: ``bn_policy="frozen"``
(the run's pre-trained statistics, shared by every point) is the one implemented policy.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from linft.runs.config import RunConfig
from linft.runs.modes import get_mode
from linft.training.pipeline import BuiltRun, build_run, finalize_trainable, probe_head
from linft.core.params import block_of, delta_comparison, differing, weight_distance
from linft.errors import LinftError
from linft.runs.store import ChildDir, load_checkpoint

KINDS = ("distance", "interp", "funcinterp", "identity", "linearity", "ntk")
BN_POLICIES = ("frozen",)
# options that never change a number (excluded from the analysis id)
NON_SEMANTIC = {"device", "engine", "method", "memory_bytes", "chunk"}
Key = tuple[str, str]


# -- reading a run -----------------------------------------------------------------------------
@dataclass
class LoadedRun:
    path: Path
    cfg: RunConfig
    trainer: BuiltRun                  # the run's data and modules (.cfg, .data, .pipe, .device)
    theta: dict[str, torch.Tensor]     # the trained parameters (final or trajectory average)
    theta0: dict[str, torch.Tensor]    # the expansion point: pre-trained weights + initial head
    head_names: frozenset
    theta0_head: str                   # "init:random" or "probe": what theta0 is for the new head
    _features: dict | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def trainable(self) -> nn.Module:
        return self.trainer.pipe.trainable

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def linear(self) -> bool:
        return get_mode(self.cfg.mode).linearized

    def features(self) -> tuple[dict[Key, list[torch.Tensor]], dict[Key, torch.Tensor]]:
        """Inputs of the trainable module (frozen parts applied once), per eval split, and labels.
        Kept in memory on the run's device: fine for the tiny and offline runs; for ResNet50 tails
        on large splits this is the memory to budget."""
        if self._features is None:
            pipe, dtype = self.trainer.pipe, next(self.trainable.parameters()).dtype
            feats, labels = {}, {}
            with torch.no_grad():
                for key, loader in self.trainer.data.eval_loaders.items():
                    zs, ys = [], []
                    for x, y in loader:
                        x = x.to(self.device)
                        x = x.to(dtype) if x.is_floating_point() else x
                        zs.append(pipe.post(pipe.pre(x)))
                        ys.append(y)
                    feats[key], labels[key] = zs, torch.cat(ys).cpu()
            self._features = (feats, labels)
        return self._features

    def roles(self) -> dict[str, str]:
        return self.trainer.data.roles


def _run_config(path: Path) -> RunConfig:
    if not path.is_dir():
        raise LinftError(f"run folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file() or not (path / "final.pt").is_file():
        raise LinftError(f"{str(path)!r} is not a finished linft run (needs config.json and final.pt)")
    return RunConfig.from_dict(json.loads((path / "config.json").read_text()))


def load_run(path: str | Path, weights: str = "trainable", device: str = "cpu", dtype: str = "float32") -> LoadedRun:
    """Rebuild a finished run's models at theta0 and theta_ft (module docstring), through the same
    builders the trainer uses; the training loop is never entered."""
    if weights not in ("trainable", "traj_avg"):
        raise LinftError(f"weights must be 'trainable' or 'traj_avg', got {weights!r}")
    if dtype not in ("float32", "float64"):
        raise LinftError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    path = Path(path)
    cfg = _run_config(path).replace(device=device, quiet=True)
    cuda = [torch.cuda.current_device()] if torch.device(cfg.device if cfg.device != "auto" else "cpu").type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # rebuilding re-seeds the global RNG: leave the caller's alone
        built = build_run(cfg)
        if cfg.head_init == "probe":
            torch.manual_seed(cfg.seed)  # as the trainer does right before probing
            probe_head(cfg, built.data, built.pipe, built.device)
    pipe = built.pipe
    theta0 = {n: p.detach().clone() for n, p in pipe.trainable.named_parameters() if p.requires_grad}
    finalize_trainable(pipe, cfg)
    final = load_checkpoint(path / "final.pt")
    state = dict(final["trainable"])
    if weights == "traj_avg":
        if "traj_avg" not in final:
            raise LinftError(f"{path.name} has no trajectory average (steps <= traj_start)")
        state.update(final["traj_avg"])
    pipe.trainable.load_state_dict(state)
    if dtype == "float64":
        for m in (pipe.pre, pipe.post, pipe.trainable):
            m.double()
        theta0 = {n: t.double() for n, t in theta0.items()}
    pipe.trainable.eval()
    if get_mode(cfg.mode).linearized:
        theta0 = {n: t.detach().clone() for n, t in pipe.trainable.theta0.as_dict().items()}
    theta = {n: p.detach().clone() for n, p in pipe.trainable.named_parameters() if p.requires_grad}
    head_ids = pipe.head_parameter_ids()
    head = frozenset(n for n, p in pipe.trainable.named_parameters() if id(p) in head_ids)
    return LoadedRun(path, cfg, built, theta, theta0, head, "probe" if cfg.head_init == "probe" else "init:random")


def restore_run(path: str | Path, weights: str = "trainable") -> BuiltRun:
    """A finished run's data and modules with its final weights loaded (``weights``: "trainable" or
    "traj_avg"), ready for evaluation (``.cfg``, ``.data``, ``.pipe``, ``.device``); nothing in the
    run folder is modified."""
    return load_run(path, weights, device="auto").trainer


# -- comparisons between runs ------------------------------------------------------------------
_DATA_FIELDS = ("dataset", "test_envs", "trial_seed", "holdout", "resolution", "backbone", "k", "dataset_limit")


def check_pair(a: LoadedRun, b: LoadedRun, same_function: bool = True) -> str:
    """Refuse runs that cannot be compared; returns "all" if theta0 is shared entirely, "body" if
    only the new heads' initialisations differ (e.g. two seeds with pre-trained weights)."""
    if set(a.theta) != set(b.theta) or any(a.theta[n].shape != b.theta[n].shape for n in a.theta):
        raise LinftError(f"runs {a.id} and {b.id} train different parameters (modes {a.cfg.mode}, {b.cfg.mode})")
    body = [n for n in a.theta0 if n not in a.head_names]
    diff = differing(a.theta0, b.theta0, body)
    if diff:
        raise LinftError(f"runs {a.id} and {b.id} do not share theta0 (the pre-trained weights differ, "
                         f"e.g. {diff[0]}): compare runs fine-tuned from the same weights")
    if same_function:
        other = [f for f in _DATA_FIELDS if getattr(a.cfg, f) != getattr(b.cfg, f)]
        if other:
            raise LinftError(f"runs {a.id} and {b.id} differ in {', '.join(other)}: not the same data and network")
        if a.linear != b.linear:
            raise LinftError(f"runs {a.id} ({a.cfg.mode}) and {b.id} ({b.cfg.mode}) are not the same kind of "
                             "function (linearized vs not): interpolate runs of one kind")
        fa, fb = _frozen_state(a), _frozen_state(b)
        if differing(fa, fb) or set(fa) != set(fb):
            raise LinftError(f"runs {a.id} and {b.id} have different frozen weights or BatchNorm statistics")
    return "body" if differing(a.theta0, b.theta0, sorted(a.head_names)) else "all"


def _frozen_state(r: LoadedRun) -> dict[str, torch.Tensor]:
    out = {f"pre.{n}": t for n, t in r.trainer.pipe.pre.state_dict().items()}
    out.update({f"post.{n}": t for n, t in r.trainer.pipe.post.state_dict().items()})
    out.update({f"trainable.{n}": t for n, t in r.trainable.state_dict().items()
                if n not in r.theta and not n.startswith("theta0.")})
    return out


# -- evaluation helpers (shared by the path analyses) -------------------------------------------
@torch.no_grad()
def logits_at(run: LoadedRun, params: dict[str, torch.Tensor], module: nn.Module | None = None) -> dict[Key, torch.Tensor]:
    """Logits (float64, CPU) of ``module`` (default the run's trainable) at ``params`` on every eval
    split; the module is not touched (functional_call)."""
    module = module if module is not None else run.trainable
    feats, _ = run.features()
    return {key: torch.cat([functional_call(module, params, (z,)).double().cpu() for z in zs])
            for key, zs in feats.items()}


def group_keys(run: LoadedRun) -> list[tuple[dict, list[Key]]]:
    """(row fields, eval keys) per eval split, then pooled i.i.d. and o.o.d."""
    roles, keys = run.roles(), list(run.features()[0])
    out = [(dict(env=e, role=roles[e], split=s), [(e, s)]) for e, s in keys]
    iid = [k for k in keys if roles[k[0]] == "train" and k[1] == "out"]
    ood = [k for k in keys if roles[k[0]] == "test"]
    if iid:
        out.append((dict(env="pooled", role="train", split="out"), iid))
    if ood:
        out.append((dict(env="pooled", role="test", split="all"), ood))
    return out


def cat(values: dict[Key, torch.Tensor], keys: list[Key]) -> torch.Tensor:
    return torch.cat([values[k] for k in keys])


def loss_acc(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"loss": F.cross_entropy(logits, labels).item(), "acc": (logits.argmax(1) == labels).double().mean().item()}


# -- analysis folders ----------------------------------------------------------------------------
def analysis_id(kind: str, run_ids: list[str], options: dict) -> str:
    semantic = {k: v for k, v in sorted(options.items()) if k not in NON_SEMANTIC}
    blob = json.dumps({"runs": list(run_ids), "options": semantic}, sort_keys=True, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def analysis_dir(kind: str, runs: list[str | Path], options: dict) -> Path:
    """The folder of analysis ``kind`` of ``runs`` with ``options`` (defaults filled in)."""
    paths = [Path(p) for p in runs]
    for p in paths:
        _run_config(p)
    return paths[0] / "analyses" / analysis_id(kind, [p.name for p in paths], resolve_options(kind, options))


def read_rows(folder: Path) -> list[dict]:
    return ChildDir(folder).read_rows()


def cached(kind: str, runs: list[str | Path], options: dict, compute: Callable[[], tuple[list[dict], dict]]) -> list[dict]:
    """Rows of the analysis folder if it is complete, else ``compute()`` -> (rows, info), stored."""
    paths = [Path(p) for p in runs]
    for p in paths:
        _run_config(p)
    child = ChildDir(paths[0] / "analyses" / analysis_id(kind, [p.name for p in paths], options))
    if child.done:
        return child.read_rows()
    rows, info = compute()
    run_id = Path(runs[0]).name
    rows = [{"run": run_id, "kind": kind, "analysis": child.path.name, **r} for r in rows]
    child.write({"kind": kind, "runs": [str(Path(p).name) for p in runs], "options": options, **info}, rows)
    return rows


# -- distance ------------------------------------------------------------------------------------
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


def resolve_options(kind: str, options: dict) -> dict:
    """``options`` completed with the kind's defaults and validated (what the analysis id hashes)."""
    if kind not in KINDS:
        raise LinftError(f"analysis kind must be one of {KINDS}, got {kind!r}")
    defaults = {"interp": dict(grid=11, min_spacing=1 / 80, refine=True, bn_policy="frozen"),
                "funcinterp": dict(grid=11, bn_policy="frozen"), "identity": dict(grid=21, bn_policy="frozen"),
                "linearity": dict(ts=(0.25, 0.5, 1.0), engine="jvp", bn_policy="frozen"),
                "ntk": dict(probe_size=64, probe_seed=0, form="trace", method="auto", memory_bytes=2 ** 31),
                "distance": {}}[kind]
    unknown = set(options) - set(defaults) - {"weights", "dtype", "device"}
    if unknown:
        raise LinftError(f"unknown option(s) for {kind}: {', '.join(sorted(unknown))}")
    opts = {"weights": "trainable", "dtype": "float32", "device": "cpu", **defaults, **options}
    if "ts" in opts:
        opts["ts"] = [float(t) for t in opts["ts"]]
    if opts.get("bn_policy", "frozen") not in BN_POLICIES:
        raise LinftError(f"bn_policy {opts['bn_policy']!r} is not implemented; linft analyses use {BN_POLICIES}")
    return opts


# -- entry point ---------------------------------------------------------------------------------
def analyze(kind: str, runs: list[str | Path], **options: Any) -> list[dict]:
    """Run (or read back) analysis ``kind`` on one or two finished runs; returns its rows.

    Options (defaults): ``weights="trainable"`` ("traj_avg"), ``dtype="float32"`` ("float64"),
    ``device="cpu"``; interp: ``grid=11``, ``min_spacing=1/80``, ``refine=True``,
    ``bn_policy="frozen"``; funcinterp: ``grid=11``; identity: ``grid=21``; linearity:
    ``ts=(0.25, 0.5, 1.0)``, ``engine="jvp"``; ntk: ``probe_size=64``, ``probe_seed=0``,
    ``form="trace"``, ``method="auto"``, ``memory_bytes=2**31``.
    """
    from linft.analysis import fidelity as analyze_fidelity
    from linft.analysis import paths as analyze_paths
    if kind not in KINDS:
        raise LinftError(f"analysis kind must be one of {KINDS}, got {kind!r}")
    runs = [Path(r) for r in runs]
    if not 1 <= len(runs) <= 2:
        raise LinftError(f"{kind} reads one or two runs, got {len(runs)}")
    if kind == "ntk" and len(runs) != 1:
        raise LinftError("ntk reads one run (its kernel at theta0 and at theta_ft)")
    opts = resolve_options(kind, options)
    fn = {"distance": distance, "interp": analyze_paths.interp, "funcinterp": analyze_paths.funcinterp,
          "identity": analyze_paths.identity, "linearity": analyze_fidelity.linearity,
          "ntk": analyze_fidelity.ntk}[kind]

    def compute():
        loaded = [load_run(p, opts["weights"], opts["device"], opts["dtype"]) for p in runs]
        return fn(loaded, **{k: v for k, v in opts.items() if k not in ("weights", "dtype", "device")}) \
            if kind != "distance" else fn(loaded)
    return cached(kind, runs, opts, compute)
