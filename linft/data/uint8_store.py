"""Decoded-image store: every image of a domain decoded once, resized to S x S, kept as uint8.

Full fine-tuning with DomainBed's augmentation is input-bound when each step decodes JPEGs on
CPU workers (measured on one H100: 1,172 img/s from 16 workers against a 3,697 img/s bf16 step). This store
decodes each dataset once into a memory-mapped ``[N, 3, S, S]`` uint8 array; the augmentation then
runs batched on the device (:mod:`linft.data.gpu_augment`), from a copy of the store kept in GPU
memory when it fits (PACS at S=256: 10k images x 196 KiB = 1.9 GiB).

Size: ``S = store_size(res)`` = ceil(res * 256 / 224), DomainBed's resize-then-crop ratio (1.14x),
so a 0.7-1.0 area crop is resampled by at most ~1.36x (downscale) per side.

Resizing: ``Resize((S, S))`` of torchvision on the PIL image (bilinear, antialiased), exactly what
the eval transform does at S; non-square images are squashed to a square, as in the eval transform.
Difference from DomainBed's train transform (RandomResizedCrop on the *original* image): crops are
taken from the squashed S x S image, so a crop's aspect ratio is relative to the squashed image,
and very large originals are pre-filtered by the resize to S (a crop then loses detail finer than
1/S of the image; at S = 1.14 res this is below the output's own resolution).

Key: dataset key, domain, S (plus the environment's content fingerprint and size), never a path;
layout ``<dir>/<digest>/{images.npy, labels.npy, meta.json, done}``, built in a ``.tmp-*`` folder
and published with one ``os.rename`` under an exclusive ``flock`` (as :mod:`feature_cache`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from linft.data.environments import Environment
from linft.data.transforms import ToRGB
from linft.errors import ConfigError

STORE_RATIO = 256 / 224


def store_size(resolution: int, ratio: float = STORE_RATIO) -> int:
    """Side S of the stored images for a training resolution (DomainBed's 256/224 by default)."""
    if int(resolution) < 8:
        raise ConfigError(f"resolution must be at least 8 pixels, got {resolution}")
    if ratio < 1.0:
        raise ConfigError(f"store ratio must be >= 1, got {ratio}")
    return int(math.ceil(int(resolution) * ratio - 1e-9))


def decode_resized(img, size: int) -> np.ndarray:
    """A raw image (PIL or uint8 [C, H, W] tensor) -> uint8 [3, size, size] (PIL bilinear, antialiased)."""
    pil = T.Resize((size, size))(ToRGB()(img))
    return np.array(pil, dtype=np.uint8).transpose(2, 0, 1)


class Uint8Store:
    """One domain's decoded images: ``images`` uint8 ``[N, 3, S, S]`` (a memmap), ``labels`` int64 ``[N]``."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, path: Path | None, built: bool):
        self.name, self.images, self.labels, self.path, self.built = name, images, labels, path, built

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.images.size) * self.images.itemsize

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self, device: str | torch.device = "cpu", max_fraction: float = 0.5):
        """``(images, labels)`` as torch tensors for :class:`~linft.data.gpu_augment.DeviceBatchSource`.

        On CUDA the images move to the GPU when they take at most ``max_fraction`` of its free
        memory; otherwise they stay in host memory (memory-mapped, zero-copy) and each batch is
        gathered on the host and copied over. Labels always go to ``device``.
        """
        device = torch.device(device)
        host = torch.from_numpy(self.images)  # copy-on-write memmap: zero-copy, no warning
        labels = torch.from_numpy(np.asarray(self.labels, dtype=np.int64)).to(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes <= max_fraction * free:
                return host.to(device), labels
        return host, labels


def _digest(key: dict, env: Environment) -> str:
    for k in ("dataset", "domain", "size"):
        if k not in key:
            raise ConfigError(f"uint8-store key lacks {k!r} (needs dataset, domain, size)")
    if str(key["domain"]) != env.name:
        raise ConfigError(f"uint8-store key names domain {key['domain']!r} but the environment is {env.name!r}")
    full = {**{k: str(v) for k, v in key.items()}, "kind": "uint8", "content": env.fingerprint(), "n": len(env)}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]


class Uint8StoreCache:
    """``Uint8StoreCache(dir).get(key, env)`` -> :class:`Uint8Store` (built once, then reused)."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir).expanduser()

    def _open(self, path: Path, name: str, built: bool) -> Uint8Store:
        return Uint8Store(name, np.load(path / "images.npy", mmap_mode="c"), np.load(path / "labels.npy"),
                          path, built)

    def get(self, key: dict, env: Environment) -> Uint8Store:
        """``key``: ``{"dataset": ..., "domain": env.name, "size": S}`` (more entries are hashed too)."""
        digest = _digest(key, env)
        final = self.dir / digest
        if (final / "done").is_file():
            return self._open(final, env.name, built=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (final / "done").is_file():
                return self._open(final, env.name, built=False)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=self.dir))
            try:
                self._build(tmp, key, env)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return self._open(final, env.name, built=True)

    def _build(self, tmp: Path, key: dict, env: Environment) -> None:
        n, size = len(env), int(key["size"])
        if n == 0:
            raise ConfigError(f"environment {env.name!r} is empty; nothing to store")
        out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        for i in range(n):
            out[i] = decode_resized(env.load(i), size)
        out.flush()
        del out
        np.save(tmp / "labels.npy", np.asarray(env.labels, dtype=np.int64))
        meta = {"key": {k: str(v) for k, v in key.items()}, "n": n, "content": env.fingerprint()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        (tmp / "done").write_text("")


def store_environments(cache: Uint8StoreCache, dataset, resolution: int,
                       ratio: float = STORE_RATIO) -> dict[str, Uint8Store]:
    """A :class:`Uint8Store` for every environment of ``dataset`` at ``S = store_size(resolution)``."""
    size = store_size(resolution, ratio)
    return {env.name: cache.get({"dataset": dataset.key, "domain": env.name, "size": size}, env)
            for env in dataset.envs}
