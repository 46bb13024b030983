"""Splits: DomainBed's protocol, made on indices *before* any transform is attached.

Every environment (training and test alike, as DomainBed evaluates all in/out splits) is split
into ``out`` (the first ``int(len * holdout_fraction)`` of a seeded shuffle, DomainBed's
``split_dataset``) and ``in`` (the rest). Because splits are index lists and transforms are chosen
per split by the loaders, the validation (``out``) split of a training domain is never augmented,
which DomainBed gets wrong (it attaches the augmenting transform to the whole environment first).

The shuffle seed is a hash of (dataset key, environment name, trial seed), so a split does not
depend on environment order or on which environments are held out. The optional per-domain size
``n`` takes the first ``n`` of a second seeded shuffle of a training domain's ``in`` split:
subsets are nested across ``n`` (the 500 lie inside the 1000) and ``out`` is unchanged by ``n``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from linft.errors import ConfigError


def derive_seed(*parts) -> int:
    """A 32-bit seed from any printable parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class EnvSplit:
    """One environment's split: ``role`` is "train" or "test"; index arrays are sorted int64."""

    env: str
    role: str
    in_idx: np.ndarray
    out_idx: np.ndarray

    def indices(self, split: str) -> np.ndarray:
        if split not in ("in", "out"):
            raise ConfigError(f"split must be 'in' or 'out', not {split!r}")
        return self.in_idx if split == "in" else self.out_idx


def holdout_split(n_items: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(in, out)`` index arrays of ``range(n_items)``, DomainBed's ``split_dataset`` rule."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    keys = np.random.RandomState(seed).permutation(n_items)
    n_out = int(n_items * holdout_fraction)
    return np.sort(keys[n_out:]), np.sort(keys[:n_out])


def subsample(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The first ``n`` of a seeded shuffle of ``indices`` (sorted): nested in ``n`` for one seed."""
    order = np.random.RandomState(seed).permutation(len(indices))
    return np.sort(np.asarray(indices)[order[:n]])


def resolve_envs(environments: list[str], envs) -> list[str]:
    """Environment names from names or indices; unknown ones raise ConfigError."""
    out = []
    for e in envs:
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            if not 0 <= e < len(environments):
                raise ConfigError(f"test environment index {e} out of range for {environments}")
            out.append(environments[e])
        elif e in environments:
            out.append(e)
        else:
            raise ConfigError(f"unknown test environment {e!r}; choose from {environments}")
    return out


def make_splits(dataset, test_envs, holdout_fraction: float = 0.2, trial_seed: int = 0,
                n_per_domain: int | None = None) -> list[EnvSplit]:
    """One :class:`EnvSplit` per environment of ``dataset`` (a MultiDomainDataset), in its order.

    ``test_envs``: names or indices left out of training (leave-one-domain-out: one of them).
    ``n_per_domain``: keep only ``n`` examples of each *training* domain's ``in`` split.
    """
    test = set(resolve_envs(dataset.environments, test_envs))
    if len(test) == len(dataset.environments):
        raise ConfigError("every environment is a test environment; nothing is left to train on")
    if n_per_domain is not None and n_per_domain < 1:
        raise ConfigError(f"n_per_domain must be positive, got {n_per_domain}")
    splits = []
    for name, env in zip(dataset.environments, dataset.envs):
        in_idx, out_idx = holdout_split(len(env), holdout_fraction, derive_seed(dataset.key, name, trial_seed))
        role = "test" if name in test else "train"
        if n_per_domain is not None and role == "train":
            if n_per_domain > len(in_idx):
                raise ConfigError(f"n_per_domain={n_per_domain} exceeds the {len(in_idx)} training "
                                  f"examples of {dataset.name} domain {name!r}")
            in_idx = subsample(in_idx, n_per_domain, derive_seed(dataset.key, name, trial_seed, "subsample"))
        splits.append(EnvSplit(name, role, in_idx, out_idx))
    return splits
