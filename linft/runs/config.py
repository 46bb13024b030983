"""Run configuration: a frozen dataclass whose defaults are the paper's protocol ([ZB] Sec. 4).

The run id is ``<prefix>-<sha256[:12]>`` of the *semantic* fields that differ from their defaults,
so adding a new defaulted field keeps every old id, and paths, device, workers and logging cadence
never enter it (moving data must not invalidate results).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from linft.errors import ConfigError

HEAD_INIT_CHOICES = ("random", "probe")
BN_POLICIES = ("frozen",)
LOADERS = ("pil", "device")


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run. Defaults: [ZB] protocol on PACS with ResNet50 IMAGENET1K_V2 weights."""

    # -- what is trained, on what ------------------------------------------------------------
    dataset: str = "PACS"
    test_envs: tuple[str, ...] = ()     # empty: the dataset's first environment (DomainBed's test_envs=[0])
    backbone: str = "resnet50.in1k_v2"
    mode: str = "full"                  # one of linft.runs.modes.MODES
    k: int = 3                          # tail = last k residual blocks (ResNet50: layer4)
    p: float = 0.0                      # dropout rate on the pooled representation
    head_init: str = "random"           # "random" (DomainBed) or "probe" (linear probe first: LP-FT)
    probe_steps: int = 300              # steps of head-only training when head_init == "probe"
    bn: str = "frozen"                  # BatchNorm policy: pre-trained statistics, never updated
    resolution: int = 0                 # 0: the backbone's native resolution
    augment: bool = True                # DomainBed's train augmentation (excludes the feature cache)
    feature_cache: bool = False         # tail/linear/unfolded/probe: read frozen-trunk features from disk
    loader: str = "pil"                 # "pil": DomainBed's PIL/torchvision loader; "device": decoded-once
                                        # uint8 store + batched augmentation on the run's device (GPU speed)
    holdout: float = 0.2                # fraction of every domain held out (the "out" split)
    n_per_domain: int = 0               # 0: all; else a nested per-domain subsample of the "in" split
    dataset_limit: int = 0              # MNIST-derived sets: 0 all images, else the first N of the shuffle
    # -- optimisation ([ZB] Sec. 4: SGD momentum 0.9, 10k steps, lr x0.1 at 5k) ----------------
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    steps: int = 10_000
    lr_decay_steps: tuple[int, ...] = (5_000,)
    lr_decay: float = 0.1
    batch_size: int = 32                # per training domain
    last_layer_lr_mult: float = 1.0     # 10: the "10x last-layer learning rate" trick
    eval_every: int = 300               # checkpoints/evaluation (and trajectory ensemble members)
    traj_start: int = 300               # trajectory averaging / ensembling starts at this step
    seed: int = 0                       # training seed (init, minibatches, dropout masks)
    trial_seed: int = 0                 # data-split seed, kept apart from the training seed
    # -- not semantic: never part of the run id ------------------------------------------------
    data_root: str = field(default="", metadata={"semantic": False})
    cache_dir: str = field(default="", metadata={"semantic": False})
    device: str = field(default="auto", metadata={"semantic": False})
    workers: int = field(default=0, metadata={"semantic": False})
    quiet: bool = field(default=False, metadata={"semantic": False})
    checkpoint_every: int = field(default=0, metadata={"semantic": False})  # 0: at every evaluation
    # how the Taylor model is computed (same values to float precision, so not semantic)
    lin_engine: str = field(default="onepass", metadata={"semantic": False})
    # mode "linear" on cached features: keep the primal activations at theta0 per training example
    # (a step then costs ~4/3 instead of 5/3 of a standard one; memory grows with the data set)
    lin_primal_cache: bool = field(default=False, metadata={"semantic": False})

    def __post_init__(self) -> None:
        for f in fields(self):  # JSON gives lists; the dataclass is frozen and hashable with tuples
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        _canonicalise(self)
        _validate(self)

    # -- identity ------------------------------------------------------------------------------
    def semantic_diff(self) -> dict[str, Any]:
        """Semantic fields that differ from their defaults (what the run id hashes)."""
        out = {}
        for f in fields(self):
            if not f.metadata.get("semantic", True):
                continue
            dv = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            v = getattr(self, f.name)
            if v != dv:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.semantic_diff(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.mode}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes``.  Changing ``dataset`` without giving ``test_envs`` keeps the
        *default* test env (the new dataset's first) if this config had its dataset's default."""
        if "dataset" in changes and "test_envs" not in changes and changes["dataset"] != self.dataset:
            names = environment_names(self.dataset)
            if names is not None and self.test_envs == names[:1]:
                changes["test_envs"] = ()
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        types = {f.name: f.type for f in fields(cls)}
        return cls(**{k: _coerce(k, types[k], v) for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot parse config file {str(path)!r}: {e}") from e
        return cls.from_dict(data)


# Environment names per dataset in the datasets' order (DomainBed's ENVIRONMENTS), known without
# building a dataset: the image-folder specs, and the MNIST-derived sets' fixed names.
MEMORY_ENVIRONMENTS: dict[str, tuple[str, ...]] = {
    "RotatedMNIST": ("0", "15", "30", "45", "60", "75"),
    "ColoredMNIST": ("+90%", "+80%", "-90%"),
    "Digits": ("mnist", "optdigits"),
}


def environment_names(dataset: str) -> tuple[str, ...] | None:
    """The dataset's environment names in order, or None for a dataset linft does not know."""
    from linft.data.datasets import FOLDER_DATASETS
    if dataset in FOLDER_DATASETS:
        return tuple(FOLDER_DATASETS[dataset].environments)
    return MEMORY_ENVIRONMENTS.get(dataset)


def resolve_test_envs(dataset: str, given) -> tuple[str, ...]:
    """Canonical test envs: environment NAMES in the dataset's order, without repeats.

    Each item may be a name, ``"#i"`` or an integer ``i`` (DomainBed's ``--test_envs i``; a digit
    string counts as an index unless it is itself a name, as RotatedMNIST's "15"); empty items
    are dropped, and none at all means the dataset's first environment (DomainBed's default
    ``test_envs=[0]``).  A dataset linft does not know keeps its items as given."""
    items = [e for e in given if str(e).strip() != ""]
    names = environment_names(dataset)
    if names is None:
        return tuple(str(e) for e in items)
    out = set()
    for e in items:
        s = str(e).strip()
        if s in names and not isinstance(e, int):
            out.add(s)
            continue
        idx = s[1:] if s.startswith("#") else s
        if idx.isdigit() and int(idx) < len(names):
            out.add(names[int(idx)])
            continue
        raise ConfigError(f"unknown test environment {e!r} for {dataset}; give a name of {list(names)}, "
                          f"an index 0-{len(names) - 1} or '#<index>'")
    return tuple(n for n in names if n in out) if out else names[:1]


def _canonicalise(c: "RunConfig") -> None:
    """One identity per run, settled before anything hashes it: the backbone alias becomes its
    full registry name and the test envs become environment names (see resolve_test_envs), so
    ``efficientnet_lite0`` / ``efficientnet_lite0.in1k`` and ``()`` / ``0`` / ``"#0"`` / ``"A"``
    give the same run id and ``config.json`` records the resolved values."""
    from linft.models.backbones import ALIASES
    object.__setattr__(c, "backbone", ALIASES.get(c.backbone, c.backbone))
    object.__setattr__(c, "test_envs", resolve_test_envs(c.dataset, c.test_envs))


def _coerce(name: str, typ: Any, v: Any) -> Any:
    t = str(typ)
    try:
        if t.startswith("tuple"):
            items = v.split(",") if isinstance(v, str) else list(v)
            conv = int if "int" in t else str
            return tuple(conv(x) for x in items if str(x).strip() != "")
        if t == "bool" and isinstance(v, str):
            if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(v)
            return v.lower() in ("1", "true", "yes")
        if t in ("int", "float", "str"):
            return {"int": int, "float": float, "str": str}[t](v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: cannot read {v!r} as {t}") from e
    return v


def _validate(c: RunConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)
    # imported here, not at the top: building the command line's help must not import torch
    from linft.core.heads import HEAD_INITS, check_dropout_rate
    from linft.data.loaders import require_compatible
    from linft.runs.modes import get_mode
    mode = get_mode(c.mode)
    import math
    for f in fields(c):  # every float: a number, finite (NaN passes every "<" check below unnoticed)
        v = getattr(c, f.name)
        if f.type == "float":
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"{f.name} must be a finite number, got {v!r}")
    check_dropout_rate(c.p)
    need(c.head_init in HEAD_INIT_CHOICES, f"head_init must be one of {HEAD_INIT_CHOICES}, got {c.head_init!r}")
    need(c.lin_engine in ("jvp", "onepass"), f"lin_engine must be 'jvp' or 'onepass', got {c.lin_engine!r}")
    need(c.bn in BN_POLICIES, f"bn must be one of {BN_POLICIES}, got {c.bn!r}")
    need(c.k >= 0, f"k must be >= 0, got {c.k}")
    need(c.lr > 0 and c.weight_decay >= 0 and 0 <= c.momentum < 1, "need lr > 0, weight_decay >= 0, 0 <= momentum < 1")
    need(c.steps >= 1 and c.batch_size >= 1, "steps and batch_size must be >= 1")
    need(c.eval_every >= 1, "eval_every must be >= 1")
    need(0 < c.holdout < 1, f"holdout must lie in (0, 1), got {c.holdout}")
    need(c.n_per_domain >= 0 and c.resolution >= 0 and c.dataset_limit >= 0,
         "n_per_domain, dataset_limit and resolution must be >= 0")
    need(all(0 < s for s in c.lr_decay_steps), "lr_decay_steps must be positive steps")
    # a decay multiplies lr at each decay step: 1 keeps it; 0 would freeze training for the rest of
    # the run, a negative factor turns descent into ascent, > 1 is a warm-up, not a decay
    need(0 < c.lr_decay <= 1, f"lr_decay must lie in (0, 1] (1: no decay), got {c.lr_decay}")
    need(c.last_layer_lr_mult > 0, "last_layer_lr_mult must be > 0")
    require_compatible(c.augment, c.feature_cache)  # one rule, stated where the loaders enforce it
    need(not (c.feature_cache and mode.trunk_trains),
         f"mode {c.mode!r} trains the trunk, so it cannot read cached trunk features")
    need(not (mode.head_is_trainable and c.head_init == "probe"), f"mode {c.mode!r} already trains the head alone")
    need(c.loader in LOADERS, f"loader must be one of {LOADERS}, got {c.loader!r}")
    need(not c.lin_primal_cache or (mode.linearized and c.feature_cache and c.lin_engine == "onepass"),
         "lin_primal_cache needs mode 'linear', feature_cache=true (fixed inputs) and lin_engine 'onepass'")
    need(not (c.loader == "device" and c.feature_cache),
         "loader 'device' reads images; the feature cache replaces them (use one or the other)")
    assert set(HEAD_INITS) >= {"random"}
