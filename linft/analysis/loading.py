"""Reading finished runs for the analyses (:mod:`linft.analysis.registry` runs and stores them).

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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from linft.runs.config import RunConfig
from linft.runs.modes import get_mode
from linft.training.pipeline import BuiltRun, build_run, finalize_trainable, probe_head
from linft.core.params import differing
from linft.errors import LinftError
from linft.runs.store import load_checkpoint, read_run_config, run_snapshots

BN_POLICIES = ("frozen",)
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


def run_config(path: str | Path) -> RunConfig:
    """The config of the finished run in ``path``; a readable error if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise LinftError(f"run folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file() or not (path / "final.pt").is_file():
        raise LinftError(f"{str(path)!r} is not a finished linft run (needs config.json and final.pt)")
    return read_run_config(path)  # refuses a damaged config.json or one edited by hand


def load_run(path: str | Path, weights: str = "trainable", device: str = "cpu", dtype: str = "float32") -> LoadedRun:
    """Rebuild a finished run's models at theta0 and theta_ft (module docstring), through the same
    builders the trainer uses; the training loop is never entered."""
    if weights not in ("trainable", "traj_avg"):
        raise LinftError(f"weights must be 'trainable' or 'traj_avg', got {weights!r}")
    if dtype not in ("float32", "float64"):
        raise LinftError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    path = Path(path)
    cfg = run_config(path).replace(device=device, quiet=True)
    cuda = [torch.cuda.current_device()] if torch.device(cfg.device if cfg.device != "auto" else "cpu").type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # rebuilding re-seeds the global RNG: leave the caller's alone
        built = build_run(cfg)
        start = run_snapshots(path).get(0)
        if start is not None and not get_mode(cfg.mode).linearized:
            # the run's own theta0, saved by the trainer after the probe (what a replay reproduces)
            built.pipe.trainable.load_state_dict(load_checkpoint(start)["trainable"])
        elif cfg.head_init == "probe":
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
    only the new heads' initialisations differ (e.g. two seeds with pre-trained weights).

    ``same_function``: the runs are evaluated as one function along a path (interp, funcinterp,
    identity: B's parameters go through A's module), so data, network, kind of function and frozen
    parts must agree. Two *linearized* runs must then share theta0 entirely, head included: a
    linearized module is the Taylor model around its own theta0, and B's parameters in A's tangent
    space are not B's model (a = 1 would not be run B)."""
    if set(a.theta) != set(b.theta) or any(a.theta[n].shape != b.theta[n].shape for n in a.theta):
        raise LinftError(f"runs {a.id} and {b.id} train different parameters (modes {a.cfg.mode}, {b.cfg.mode})")
    body = [n for n in a.theta0 if n not in a.head_names]
    diff = differing(a.theta0, b.theta0, body)
    if diff:
        raise LinftError(f"runs {a.id} and {b.id} do not share theta0 (the pre-trained weights differ, "
                         f"e.g. {diff[0]}): compare runs fine-tuned from the same weights")
    head_diff = differing(a.theta0, b.theta0, sorted(a.head_names))
    if same_function:
        other = [f for f in _DATA_FIELDS if getattr(a.cfg, f) != getattr(b.cfg, f)]
        if other:
            raise LinftError(f"runs {a.id} and {b.id} differ in {', '.join(other)}: not the same data and network")
        if a.linear != b.linear:
            raise LinftError(f"runs {a.id} ({a.cfg.mode}) and {b.id} ({b.cfg.mode}) are not the same kind of "
                             "function (linearized vs not): interpolate runs of one kind")
        if a.linear and head_diff:
            raise LinftError(f"linearized runs {a.id} and {b.id} do not share theta0: their heads were initialised "
                             f"differently (head_init {a.cfg.head_init} vs {b.cfg.head_init}, seed {a.cfg.seed} vs "
                             f"{b.cfg.seed}; e.g. {head_diff[0]}), so they are Taylor models around different "
                             "points: compare linearized runs with one theta0")
        fa, fb = frozen_state(a), frozen_state(b)
        if differing(fa, fb) or set(fa) != set(fb):
            raise LinftError(f"runs {a.id} and {b.id} have different frozen weights or BatchNorm statistics")
    return "body" if head_diff else "all"


def frozen_state(r: LoadedRun) -> dict[str, torch.Tensor]:
    """Everything a run evaluates with but does not train: the frozen trunk (``pre``, ``post``),
    and the trainable module's buffers (BatchNorm statistics; a linearized module's theta0)."""
    out = {f"pre.{n}": t for n, t in r.trainer.pipe.pre.state_dict().items()}
    out.update({f"post.{n}": t for n, t in r.trainer.pipe.post.state_dict().items()})
    out.update({f"trainable.{n}": t for n, t in r.trainable.state_dict().items()
                if n not in r.theta and not n.startswith("theta0.")})
    return out


def first_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    """The first name whose tensors differ (or that only one side has); None if equal."""
    only = sorted(set(a) ^ set(b))
    if only:
        return only[0]
    diff = differing(a, b)
    return diff[0] if diff else None


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


def rel_norm(num: torch.Tensor, den: torch.Tensor) -> float:
    """||num||_F / ||den||_F (0 if both vanish, inf if only the denominator does)."""
    d = float(den.norm())
    return float(num.norm()) / d if d > 0 else (0.0 if float(num.norm()) == 0 else float("inf"))


def endpoints(runs: list[LoadedRun]) -> tuple[dict, dict, str, str, dict]:
    """(theta_A, theta_B, label A, label B, row fields) of a straight path: one run -> (theta0,
    theta_ft), the head at a = 0 its initial value; two runs -> (theta_A, theta_B), checked to be
    one function (:func:`check_pair`)."""
    if len(runs) == 1:
        r = runs[0]
        return r.theta0, r.theta, "theta0", f"ft:{r.id}", {"head_at_0": "init" if r.theta0_head != "probe" else "probe"}
    a, b = runs
    shared = check_pair(a, b)
    return a.theta, b.theta, f"ft:{a.id}", f"ft:{b.id}", {"theta0_shared": shared}
