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
LIN_ENGINES = ("jvp", "onepass")


def _doc(help: str, choices=None, semantic: bool = True, unit: str = "", metavar: str = "") -> dict:
    """Field metadata: the one place a field's meaning is written (``linft train --help`` shows it)."""
    md: dict[str, Any] = {"help": help + (f" [{unit}]" if unit else "")}
    if choices is not None:
        md["choices"] = choices
    if metavar:
        md["metavar"] = metavar
    if not semantic:
        md["semantic"] = False
    return md


def _mode_names() -> tuple[str, ...]:
    from linft.runs.modes import MODES  # imports torch: only when the choices are needed
    return tuple(MODES)


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run. Defaults: [ZB] protocol on PACS with ResNet50 IMAGENET1K_V2 weights."""

    # -- what is trained, on what ------------------------------------------------------------
    dataset: str = field(default="PACS", metadata=_doc("dataset name (DomainBed's, or an MNIST-derived set)"))
    test_envs: tuple[str, ...] = field(default=(), metadata=_doc(
        "held-out test domains, comma-separated; empty: the dataset's first domain (DomainBed's test_envs=[0])"))
    backbone: str = field(default="resnet50.in1k_v2", metadata=_doc(
        "registry name <arch>.<weights>, e.g. resnet50.in1k_v2, efficientnet_lite0.in1k, resnet50.random"))
    mode: str = field(default="full", metadata=_doc("what trains and what stays frozen ([ZB] Sec. 3-4)",
                                                     choices=_mode_names))
    k: int = field(default=3, metadata=_doc("tail = the last k residual blocks (ResNet50: 3 = layer4)", unit="blocks"))
    p: float = field(default=0.0, metadata=_doc("dropout rate on the pooled representation, in [0, 1)"))
    head_init: str = field(default="random", metadata=_doc(
        "where the new head starts: random (DomainBed) or probe (linear probe first: LP-FT)",
        choices=HEAD_INIT_CHOICES))
    probe_steps: int = field(default=300, metadata=_doc("head-only training steps when head_init is probe",
                                                        unit="steps"))
    probe_dropout: bool = field(default=True, metadata=_doc(
        "the probe trains under the run's dropout p (the head's own dropout); false: without dropout, "
        "so every p of a study starts from the same probed head (with probe_lr: the same theta0 per seed)"))
    probe_lr: float = field(default=0.0, metadata=_doc(
        "the probe's SGD learning rate; 0: 10 x lr. Set it to give every lr and p of a study one shared "
        "probed head (the same theta0 per seed)"))
    bn: str = field(default="frozen", metadata=_doc("BatchNorm policy: pre-trained statistics, never updated",
                                                    choices=BN_POLICIES))
    resolution: int = field(default=0, metadata=_doc("input side; 0: the backbone's native resolution", unit="pixels"))
    augment: bool = field(default=True, metadata=_doc(
        "DomainBed's train augmentation (excludes the feature cache)"))
    feature_cache: bool = field(default=False, metadata=_doc(
        "modes tail/linear/unfolded/probe: read frozen-trunk features from disk (needs --no-augment)"))
    loader: str = field(default="pil", metadata=_doc(
        "pil: DomainBed's PIL/torchvision loader; device: decoded-once uint8 store + batched augmentation on the "
        "run's device (GPU speed)", choices=LOADERS))
    holdout: float = field(default=0.2, metadata=_doc("fraction of every domain held out (the 'out' split), in (0, 1)"))
    n_per_domain: int = field(default=0, metadata=_doc(
        "0: all; else a nested per-domain subsample of the 'in' split", unit="images"))
    dataset_limit: int = field(default=0, metadata=_doc(
        "MNIST-derived sets: 0 all images, else the first N of the shuffle", unit="images"))
    # -- optimisation ([ZB] Sec. 4: SGD momentum 0.9, 10k steps, lr x0.1 at 5k) ----------------
    lr: float = field(default=1e-3, metadata=_doc("SGD learning rate"))
    weight_decay: float = field(default=1e-4, metadata=_doc("SGD weight decay (L2)"))
    momentum: float = field(default=0.9, metadata=_doc("SGD momentum, in [0, 1)"))
    steps: int = field(default=10_000, metadata=_doc("training steps", unit="steps"))
    lr_decay_steps: tuple[int, ...] = field(default=(5_000,), metadata=_doc(
        "steps at which the lr is multiplied by lr_decay, comma-separated", unit="steps"))
    lr_decay: float = field(default=0.1, metadata=_doc("lr factor at each of lr_decay_steps"))
    batch_size: int = field(default=32, metadata=_doc("examples per training domain per step", unit="images"))
    last_layer_lr_mult: float = field(default=1.0, metadata=_doc(
        "head lr multiplier; 10: the '10x last-layer learning rate' trick"))
    eval_every: int = field(default=300, metadata=_doc(
        "evaluation + checkpoint interval (also trajectory-ensemble members)", unit="steps"))
    traj_start: int = field(default=300, metadata=_doc("trajectory averaging / ensembling starts here", unit="steps"))
    snapshot_steps: tuple[int, ...] = field(default=(), metadata=_doc(
        "also keep the trainable weights at these steps (snapshots/step_<N>.pt) for linearity along the "
        "trajectory", unit="steps"))
    eval_limit: int = field(default=0, metadata=_doc(
        "evaluate at most this many examples of each split (a fixed subset per trial_seed); 0: all",
        unit="examples"))
    seed: int = field(default=0, metadata=_doc("training seed (head init, minibatches, dropout masks)"))
    trial_seed: int = field(default=0, metadata=_doc("data-split seed, kept apart from the training seed"))
    weights_sha256: str = field(default="", metadata=_doc(
        "sha256 of weights_file (filled in from the file; the run id hashes it, never the path)"))
    # -- not semantic: never part of the run id ------------------------------------------------
    data_root: str = field(default="", metadata=_doc("dataset folder (DomainBed's --data_dir)", semantic=False,
                                                     metavar="DIR"))
    cache_dir: str = field(default="", metadata=_doc(
        "derived data (feature caches, uint8 stores); empty: <data_root>/.linft_cache", semantic=False, metavar="DIR"))
    device: str = field(default="auto", metadata=_doc("auto (cuda if available), cpu, cuda, cuda:1 ...",
                                                      semantic=False))
    workers: int = field(default=0, metadata=_doc("data-loader worker processes", semantic=False))
    quiet: bool = field(default=False, metadata=_doc(
        "print nothing while training (no bar, no evaluation lines)", semantic=False))
    checkpoint_every: int = field(default=0, metadata=_doc(
        "extra checkpoints between evaluations; 0: at every evaluation", semantic=False, unit="steps"))
    # how the Taylor model is computed (same values to float precision, so not semantic)
    lin_engine: str = field(default="onepass", metadata=_doc(
        "how the Taylor model is computed (same values to float precision)", choices=LIN_ENGINES, semantic=False))
    lin_primal_cache: bool = field(default=False, metadata=_doc(
        "mode linear on cached features: keep the primal activations at theta0 per training example (a step "
        "costs ~4/3 instead of 5/3 of a standard one; memory grows with the data set)", semantic=False))
    weights_file: str = field(default="", metadata=_doc(
        "your own weights for the backbone's architecture (a state dict read with torch.load(weights_only=True)); "
        "empty: the registry's file", semantic=False, metavar="PATH"))
    tensorboard: str = field(default="", metadata=_doc(
        "mirror every row to TensorBoard event files in DIR/<run id> (needs the tensorboard package)",
        semantic=False, metavar="DIR"))
    keep_checkpoint: bool = field(default=False, metadata=_doc(
        "keep checkpoint.pt (optimizer, average, ensemble) after the run is done (else only final.pt stays)",
        semantic=False))

    def __post_init__(self) -> None:
        for f in fields(self):  # JSON gives lists; the dataclass is frozen and hashable with tuples
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        _canonicalise(self)
        _fill_weights_sha256(self)
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
    need(c.probe_lr >= 0, f"probe_lr must be >= 0 (0: 10 x lr), got {c.probe_lr}")
    need(c.eval_limit >= 0, f"eval_limit must be >= 0 (0: all), got {c.eval_limit}")
    need(all(0 <= s <= c.steps for s in c.snapshot_steps),
         f"snapshot_steps must lie in [0, steps={c.steps}], got {list(c.snapshot_steps)}")
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
    need(not (mode.calibrate and c.head_init == "probe"),
         f"mode {c.mode!r} with head_init=probe is not supported (its representation is calibrated after the "
         "head is initialised); use head_init=random")
    need(c.loader in LOADERS, f"loader must be one of {LOADERS}, got {c.loader!r}")
    need(not c.lin_primal_cache or (mode.linearized and c.feature_cache and c.lin_engine == "onepass"),
         "lin_primal_cache needs mode 'linear', feature_cache=true (fixed inputs) and lin_engine 'onepass'")
    need(not (c.loader == "device" and c.feature_cache),
         "loader 'device' reads images; the feature cache replaces them (use one or the other)")
    assert set(HEAD_INITS) >= {"random"}


# -- a user's own weights: the run id hashes the file's content, never its path ------------------
_SHA_MEMO: dict[tuple, str] = {}


def weights_file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, memoised by (real path, size, mtime) so a sweep hashes each file once."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file {str(p)!r} does not exist")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def _fill_weights_sha256(c: RunConfig) -> None:
    """``weights_file`` set: fill ``weights_sha256`` from it, or check that a recorded hash still
    matches the file. A recorded hash with no file at hand (a finished run read elsewhere) is kept."""
    if not c.weights_file:
        return
    path = Path(c.weights_file).expanduser()
    if c.weights_sha256 and not path.is_file():
        return
    digest = weights_file_sha256(path)
    if c.weights_sha256 and c.weights_sha256 != digest:
        raise ConfigError(f"weights file {c.weights_file!r} has sha256 {digest[:12]}... but the config records "
                          f"{c.weights_sha256[:12]}...: the file changed (set weights_sha256 to '' to adopt it)")
    object.__setattr__(c, "weights_sha256", digest)


# -- field documentation (the command line is generated from it) ---------------------------------
@dataclass(frozen=True)
class FieldDoc:
    name: str
    type: str          # "int", "float", "str", "bool", "tuple[int, ...]", "tuple[str, ...]"
    default: Any
    help: str
    semantic: bool
    choices: Any       # a tuple, a callable returning one (resolved lazily), or None
    metavar: str = ""  # the flag's placeholder in --help (default: from the type)


def field_docs() -> list[FieldDoc]:
    """Every RunConfig field with its meaning, default, choices and whether it enters the run id
    (``linft train --help`` is built from this; nothing here imports torch)."""
    return [FieldDoc(f.name, str(f.type), f.default, f.metadata.get("help", ""), f.metadata.get("semantic", True),
                     f.metadata.get("choices"), f.metadata.get("metavar", "")) for f in fields(RunConfig)]
