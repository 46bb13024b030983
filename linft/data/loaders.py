"""Loaders: one infinite, seeded loader per training domain, zipped into DomainBed-style steps.

Determinism: the batch sampler draws example indices *and* one augmentation seed per example from
numpy generators seeded by (seed, domain); each example's transform then runs under
``torch.random.fork_rng`` seeded with its own seed. The stream is therefore the same with 0 or N
workers and is unaffected by whatever else uses torch's global generator (model init, dropout).

A loader worker that fails on one example (a corrupt image) re-raises in the main process with the
worker's whole traceback in the message; :class:`Loader` turns such a linft error back into its one
line (``cannot read image <path>: ...``), as with ``workers=0``.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from linft.data.splits import EnvSplit, derive_seed, subsample
from linft.errors import ConfigError, LinftError

AUGMENT_VS_CACHE = ("augmentation and a feature cache exclude each other: cached trunk features are "
                    "computed once without augmentation; turn augmentation off or do not use the cache")


def require_compatible(augment: bool, feature_cache: bool) -> None:
    """Raise ConfigError when both augmentation and a feature cache are requested."""
    if augment and feature_cache:
        raise ConfigError(AUGMENT_VS_CACHE)


def _one_line(err: LinftError) -> LinftError:
    """A linft error re-raised from a DataLoader worker ("Caught X in DataLoader worker process N.
    Original Traceback ...") -> the same error with the original one-line message."""
    text = str(err)
    if "in DataLoader worker process" not in text:
        return err
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    last = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return type(err)(last)


def _guarded(iterator):
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except LinftError as e:
            raise _one_line(e) from None
        yield batch


class Loader(DataLoader):
    """A DataLoader whose workers' linft errors (a corrupt image) arrive as their one line."""

    def __iter__(self):
        it = super().__iter__()
        return it if self.num_workers == 0 else _guarded(it)


class EnvDataset(Dataset):
    """A torch Dataset over an Environment: item ``i`` or ``(i, aug_seed)`` -> ``(x, label)``.

    ``x`` is ``transform(env.load(i))``, or ``env.load(i)`` itself when ``transform`` is None
    (cached features, already float ``[C, h, w]``).
    """

    def __init__(self, env, transform=None):
        if getattr(env, "is_feature_cache", False) and transform is not None:
            raise ConfigError(AUGMENT_VS_CACHE + " (a transform was given for cached features)")
        self.env = env
        self.transform = transform

    def __len__(self) -> int:
        return len(self.env)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        x = self.env.load(int(i))
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    x = self.transform(x)
        return x, int(self.env.labels[i])


class InfiniteBatchSampler:
    """Endless batches of ``(index, aug_seed)`` drawn from ``indices``.

    ``replacement=True`` samples uniformly with replacement, as DomainBed's InfiniteDataLoader;
    ``False`` walks through successive seeded permutations (each example once per epoch).
    """

    def __init__(self, indices, batch_size: int, seed: int, replacement: bool = True, start: int = 0):
        self.start = start  # batches to skip: resuming at step ``start`` continues the same stream
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ConfigError("cannot build a loader over an empty split")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.replacement = batch_size, seed, replacement

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pick_ss, aug_ss = np.random.SeedSequence(self.seed).spawn(2)
        pick, aug = np.random.default_rng(pick_ss), np.random.default_rng(aug_ss)
        buf = np.empty(0, dtype=np.int64)
        skipped = 0
        while True:
            if self.replacement:
                pos = pick.integers(0, len(self.indices), self.batch_size)
            else:
                while len(buf) < self.batch_size:
                    buf = np.concatenate([buf, pick.permutation(len(self.indices))])
                pos, buf = buf[:self.batch_size], buf[self.batch_size:]
            seeds = aug.integers(0, 2**31 - 1, self.batch_size)
            if skipped < self.start:  # only indices are drawn while skipping: cheap
                skipped += 1
                continue
            yield [(int(self.indices[p]), int(s)) for p, s in zip(pos, seeds)]

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


class InfiniteLoader:
    """``iter(loader)`` yields ``(x [B, ...], y [B])`` forever; each ``iter`` restarts the same stream."""

    def __init__(self, env, indices, transform=None, batch_size: int = 32, seed: int = 0,
                 num_workers: int = 0, replacement: bool = True, start: int = 0):
        self.env_name = env.name
        self.sampler = InfiniteBatchSampler(indices, batch_size, seed, replacement, start)
        # Own generator: creating an iterator must not draw from torch's global RNG (dropout masks).
        self.loader = Loader(EnvDataset(env, transform), batch_sampler=self.sampler,
                                 num_workers=num_workers, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(seed))

        # Cached features need no transform: gather each batch with one fancy index of the memmap
        # instead of item-by-item DataLoader collation (same tensors, several times faster).
        self.arrays = (env.features, env.labels) if getattr(env, "is_feature_cache", False) and transform is None \
            and num_workers == 0 else None

    def __iter__(self):
        if self.arrays is None:
            return iter(self.loader)
        return self._gather(self.loader.batch_sampler)  # the loader's sampler: sharding replaces it

    def _gather(self, sampler):
        feats, labels = self.arrays
        for batch in sampler:
            idx = np.fromiter((i for i, _ in batch), dtype=np.int64, count=len(batch))
            yield (torch.from_numpy(np.asarray(feats[idx], dtype=np.float32)),
                   torch.from_numpy(np.asarray(labels[idx], dtype=np.int64)))


def _env_by_name(data, name: str):
    if isinstance(data, dict):
        if name not in data:
            raise ConfigError(f"no environment {name!r} among {sorted(data)}")
        return data[name]
    return data[name]


def train_loaders(data, splits: list[EnvSplit], transform=None, *, batch_size: int = 32, seed: int = 0,
                  num_workers: int = 0, replacement: bool = True, start_step: int = 0) -> list[InfiniteLoader]:
    """One :class:`InfiniteLoader` per training split's ``in`` indices, in environment order.

    ``data``: a MultiDomainDataset, or a dict ``env name -> Environment`` (e.g. cached features,
    for which ``transform`` must be None). Each domain's stream is seeded by (seed, env name);
    ``start_step`` skips that many batches, so a resumed run continues the same stream.
    """
    return [InfiniteLoader(_env_by_name(data, s.env), s.in_idx, transform, batch_size,
                           derive_seed("loader", seed, s.env), num_workers, replacement, start_step)
            for s in splits if s.role == "train"]


class CachedSplit:
    """Ordered batches ``(x, y)`` of cached features over ``indices`` (an eval loader without
    per-item collation)."""

    def __init__(self, env, indices, batch_size: int):
        self.env, self.indices, self.batch_size = env, np.asarray(indices, dtype=np.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start:start + self.batch_size]
            yield (torch.from_numpy(np.asarray(self.env.features[idx], dtype=np.float32)),
                   torch.from_numpy(np.asarray(self.env.labels[idx], dtype=np.int64)))


def eval_loaders(data, splits: list[EnvSplit], transform=None, *, batch_size: int = 128,
                 num_workers: int = 0, limit: int = 0, seed: int = 0) -> dict[tuple[str, str], DataLoader]:
    """Finite, ordered loaders for every environment's ``in`` and ``out`` split (DomainBed evaluates
    all of them), keyed by ``(env name, "in" | "out")``; empty splits are left out. ``limit`` > 0
    keeps at most that many examples of each split: a subset drawn from ``seed``, the environment
    and the split, so every run of one data split evaluates on the same examples."""
    out = {}
    for s in splits:
        env = _env_by_name(data, s.env)
        ds = EnvDataset(env, transform)
        for split in ("in", "out"):
            idx = s.indices(split)
            if limit and len(idx) > limit:
                idx = np.sort(subsample(idx, limit, derive_seed(seed, s.env, split, "eval_limit")))
            if len(idx) and getattr(env, "is_feature_cache", False) and transform is None and num_workers == 0:
                out[(s.env, split)] = CachedSplit(env, idx, batch_size)
            elif len(idx):
                out[(s.env, split)] = Loader(torch.utils.data.Subset(ds, idx.tolist()),
                                                 batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                                 generator=torch.Generator().manual_seed(0))
    return out


def zip_minibatches(loaders) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """One list of ``(x, y)`` per step, one entry per training domain (DomainBed's
    ``zip(*train_loaders)``); endless when the loaders are."""
    for batches in zip(*[iter(loader) for loader in loaders]):
        yield list(batches)


# -- several processes: each rank draws its share of every batch --------------------------------
class _ShardedBatchSampler:
    """Examples ``rank::world`` of every batch of ``sampler`` (indices and augmentation seeds)."""

    def __init__(self, sampler, rank: int, world_size: int):
        self.sampler, self.rank, self.world = sampler, rank, world_size

    def __iter__(self):
        for batch in self.sampler:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.sampler)


def shard_loaders(loaders: list, rank: int, world_size: int) -> list:
    """Give each :class:`~linft.data.loaders.InfiniteLoader` a DataLoader over this rank's share."""
    for ld in loaders:
        old = ld.loader
        if ld.sampler.batch_size < world_size:
            raise ConfigError(f"batch_size {ld.sampler.batch_size} is smaller than the {world_size} processes")
        ld.loader = Loader(old.dataset, batch_sampler=_ShardedBatchSampler(ld.sampler, rank, world_size),
                               num_workers=old.num_workers, persistent_workers=False, generator=old.generator)
    return loaders
