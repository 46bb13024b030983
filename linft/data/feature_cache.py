"""Frozen-trunk feature cache: trunk activations computed once per image, memory-mapped on disk.

Key: backbone name, weights hash, split point (e.g. "k=3"), dataset key, domain, resolution, plus
the storage dtype and the environment's content fingerprint (relative file names and labels; the
pixels of an in-memory environment), each image file's size and mtime_ns (:func:`file_stamp`: an
image replaced in place rebuilds), and never a path: moving the data root (times preserved)
keeps the cache, changing any key part rebuilds it. A damaged cache (truncated ``features.npy``,
unreadable labels) is rebuilt, not memory-mapped.

Layout: ``<cache_dir>/<digest>/{features.npy, labels.npy, meta.json, done}``. Building happens in
``<cache_dir>/.tmp-<digest>-<random>/`` and ends with one ``os.rename``; an exclusive
``fcntl.flock`` on ``<digest>.lock`` makes a second process wait for the first build instead of
repeating it. A crash leaves only a ``.tmp-*`` folder, which never looks complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from linft.data.environments import Environment
from linft.data.transforms import eval_transform
from linft.errors import ConfigError

REQUIRED_KEYS = ("backbone", "weights", "split", "dataset", "domain", "resolution")
DTYPES = {"float32": np.float32, "float16": np.float16}


def module_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes, values): a weights hash for trunks
    whose weights do not come from a file (random init, a user's in-memory model)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_stamp(env: Environment) -> str | None:
    """For an image-folder environment, a hash of every file's size and mtime_ns (in sample order):
    an image replaced in place under the same name and label changes the key. None for other
    environments (an in-memory one's fingerprint already hashes its pixels). Moving or copying the
    data root with times preserved (mv, cp -a, rsync -a) keeps the key."""
    samples = getattr(env, "samples", None)
    if samples is None:
        return None
    h = hashlib.sha256()
    for path, _ in samples:
        try:
            st = os.stat(path)
            h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"missing\n")
    return h.hexdigest()[:24]


class CachedFeatures(Environment):
    """An Environment over cached features: ``features`` ``[N, C, h, w]`` (a read-only memmap),
    ``labels`` int64 ``[N]``; ``load(i)`` returns a float32 tensor ``[C, h, w]``."""

    is_feature_cache = True

    def __init__(self, name: str, features: np.ndarray, labels: np.ndarray, path: Path, built: bool):
        self.name, self.features, self.labels, self.path, self.built = name, features, labels, path, built

    def load(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[i], dtype=np.float32))  # a copy: the memmap is read-only

    def fingerprint(self) -> str:
        return self.path.name


class FeatureCache:
    """``FeatureCache(dir).get(trunk, key, env, mean, std)`` -> :class:`CachedFeatures`.

    ``dtype`` "float16" halves the disk and memory footprint at a relative error <= 2**-11.
    """

    def __init__(self, cache_dir: str | os.PathLike, dtype: str = "float32", batch_size: int = 64,
                 num_workers: int = 0, device: str | torch.device = "cpu"):
        if dtype not in DTYPES:
            raise ConfigError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dir = Path(cache_dir).expanduser()
        self.dtype, self.batch_size, self.num_workers, self.device = dtype, batch_size, num_workers, device

    def digest(self, key: dict, env: Environment) -> str:
        missing = [k for k in REQUIRED_KEYS if k not in key]
        if missing:
            raise ConfigError(f"feature-cache key lacks {missing} (needs {list(REQUIRED_KEYS)})")
        if str(key["domain"]) != env.name:
            raise ConfigError(f"feature-cache key names domain {key['domain']!r} but the environment is {env.name!r}")
        full = {**{k: str(v) for k, v in key.items()}, "dtype": self.dtype, "content": env.fingerprint(), "n": len(env)}
        files = file_stamp(env)
        if files is not None:
            full["files"] = files
        return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]

    def _open(self, path: Path, name: str, built: bool) -> CachedFeatures | None:
        """The cache at ``path``, or None when it is damaged (a truncated or unreadable array, or
        counts that disagree with meta.json): the caller rebuilds it."""
        try:
            n = json.loads((path / "meta.json").read_text())["n"]
            feats = np.load(path / "features.npy", mmap_mode="r")
            labels = np.load(path / "labels.npy")
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            return None
        if len(feats) != n or len(labels) != n:
            return None
        return CachedFeatures(name, feats, labels, path, built)

    def get(self, trunk: nn.Module, key: dict, env: Environment, mean, std) -> CachedFeatures:
        """Cached features of every image of ``env``, building them if needed.

        ``trunk`` maps normalised images ``[B, 3, R, R]`` (R = ``key["resolution"]``) to features
        ``[B, C, h, w]`` (any shape works, it is stored as is); it runs in eval mode under
        ``torch.no_grad`` with the eval transform (no augmentation), its mode is restored after.
        """
        digest = self.digest(key, env)
        final = self.dir / digest
        if (final / "done").is_file():
            found = self._open(final, env.name, built=False)
            if found is not None:
                return found
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
            if (final / "done").is_file():  # another process built it while we waited
                found = self._open(final, env.name, built=False)
                if found is not None:
                    return found
            print(f"feature cache: computing {env.name} ({len(env)} images) -> {final}", flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=self.dir))
            try:
                self._build(tmp, trunk, key, env, mean, std)
                if final.exists():  # a leftover without "done" (manual copy, old crash), or damaged
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out = self._open(final, env.name, built=True)
        if out is None:
            raise ConfigError(f"the feature cache just built in {final} cannot be read back")
        return out

    def _build(self, tmp: Path, trunk: nn.Module, key: dict, env: Environment, mean, std) -> None:
        from linft.data.loaders import EnvDataset
        transform = eval_transform(mean, std, int(key["resolution"]))
        loader = torch.utils.data.DataLoader(EnvDataset(env, transform), batch_size=self.batch_size,
                                             shuffle=False, num_workers=self.num_workers)
        was_training = trunk.training
        trunk.eval()
        out, pos, labels = None, 0, np.empty(len(env), np.int64)
        try:
            with torch.no_grad():
                for x, y in loader:
                    f = trunk(x.to(self.device)).float().cpu().numpy()
                    if out is None:
                        out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                                        dtype=DTYPES[self.dtype], shape=(len(env), *f.shape[1:]))
                    out[pos:pos + len(f)] = f
                    labels[pos:pos + len(f)] = y.numpy()
                    pos += len(f)
        finally:
            trunk.train(was_training)
        if out is None:
            raise ConfigError(f"environment {env.name!r} is empty; nothing to cache")
        if self.dtype == "float16" and not np.isfinite(out).all():
            raise ConfigError(f"trunk features of {env.name!r} overflow float16 (|x| > 65504); use float32")
        out.flush()
        del out
        np.save(tmp / "labels.npy", labels)
        meta = {"key": {k: str(v) for k, v in key.items()}, "dtype": self.dtype, "n": len(env),
                "content": env.fingerprint()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        (tmp / "done").write_text("")  # inside tmp: the rename publishes data and marker at once


def cache_environments(cache: FeatureCache, trunk: nn.Module, dataset, *, backbone: str, weights: str,
                       split: str, resolution: int, mean, std) -> dict[str, CachedFeatures]:
    """Cached features for every environment of ``dataset``: ``env name -> CachedFeatures``, ready
    for :func:`linft.data.loaders.train_loaders` / ``eval_loaders`` with ``transform=None``."""
    out = {}
    for env in dataset.envs:
        key = {"backbone": backbone, "weights": weights, "split": split, "dataset": dataset.key,
               "domain": env.name, "resolution": resolution}
        out[env.name] = cache.get(trunk, key, env, mean, std)
    return out
