"""The data side of one run: dataset, splits, the feature cache or transforms, loaders."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from linft.errors import ConfigError
from linft.runs.config import RunConfig
from linft.data.datasets import get_dataset
from linft.data.loaders import eval_loaders, shard_loaders, train_loaders, zip_minibatches
from linft.data.splits import derive_seed, make_splits
from linft.data.transforms import transforms_for


class RunData:
    """``eval_loaders[(env, split)]`` (finite), ``train_batches(start)`` (endless, step-indexed)."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        options = {"limit": cfg.dataset_limit} if cfg.dataset_limit else {}
        self.dataset = get_dataset(cfg.dataset, cfg.data_root or None, **options)
        envs = self.dataset.environments
        # "#i" names the i-th environment (a grid over datasets cannot spell their domain names)
        test_envs = [envs[int(e[1:])] if e.startswith("#") and e[1:].isdigit() and int(e[1:]) < len(envs) else e
                     for e in cfg.test_envs] or [envs[0]]
        self.splits = make_splits(self.dataset, test_envs, cfg.holdout, cfg.trial_seed, cfg.n_per_domain or None)
        self.roles = {s.env: s.role for s in self.splits}
        self.num_classes = self.dataset.num_classes
        self.labels: dict = {}
        self.shard: tuple[int, int] | None = None  # (rank, world) of several processes: this rank's share

    def attach(self, pipe) -> None:
        """Choose the inputs: cached trunk features (then ``pipe.pre`` becomes the identity) or images."""
        cfg, spec = self.cfg, pipe.spec
        res = cfg.resolution or spec.resolution
        if cfg.feature_cache:
            from linft.data.feature_cache import FeatureCache, cache_environments, module_hash
            self.inputs = cache_environments(
                FeatureCache(self.cache_dir, device=self.device), pipe.pre, self.dataset, backbone=spec.name,
                weights=module_hash(pipe.pre), split=f"k={cfg.k}", resolution=res, mean=spec.mean, std=spec.std)
            pipe.pre = torch.nn.Identity()
            self.train_tf = self.eval_tf = None
        elif cfg.loader == "device":
            self._attach_device(spec, res)
            return
        else:
            self.inputs = self.dataset
            self.train_tf = transforms_for(spec, res, augment=cfg.augment)
            self.eval_tf = transforms_for(spec, res, augment=False)
        self.eval_loaders = eval_loaders(self.inputs, self.splits, self.eval_tf, batch_size=256,
                                         num_workers=cfg.workers, limit=cfg.eval_limit,
                                         seed=derive_seed(self.dataset.key, cfg.trial_seed))

    def _attach_device(self, spec, res: int) -> None:
        """loader="device": every domain decoded once into a uint8 store (S = 1.14 res, memory-mapped,
        on the GPU when it fits), DomainBed's augmentation applied to whole batches on the device."""
        from linft.data.gpu_augment import DeviceAugment, DeviceEval, DeviceSplit
        from linft.data.uint8_store import Uint8StoreCache, store_environments
        self.stores = store_environments(Uint8StoreCache(self.cache_dir / "uint8"), self.dataset, res)
        self.inputs, self.train_tf = self.dataset, None
        # channels_last: the trainer's layout (linft.training.evaluate.channels_last)
        aug = DeviceAugment if self.cfg.augment else DeviceEval
        self.device_tf = aug(spec.mean, spec.std, res, channels_last=True)
        self.eval_tf = DeviceEval(spec.mean, spec.std, res, channels_last=True)
        self.eval_loaders = {}
        for s in self.splits:
            images, labels = self.stores[s.env].tensors(self.device)
            for split in ("in", "out"):
                idx = s.indices(split)
                if self.cfg.eval_limit and len(idx) > self.cfg.eval_limit:
                    raise ConfigError("eval_limit is not implemented for loader=device; use loader=pil")
                if len(idx):
                    self.eval_loaders[(s.env, split)] = DeviceSplit(images, labels, idx, 256, self.eval_tf,
                                                                    self.device)

    @property
    def cache_dir(self) -> Path:
        """Where derived data (feature caches, uint8 stores) goes: cache_dir, else <data_root>/.linft_cache."""
        return Path(self.cfg.cache_dir or Path(self.cfg.data_root or ".") / ".linft_cache").expanduser()

    def train_batches(self, start: int, stream: str = "train") -> Iterator[list]:
        """One list of ``(x, y)`` per step (one entry per training domain), starting at step ``start``.

        Step ``t``'s examples depend only on (seed, stream, domain, t): resuming is exact."""
        if self.cfg.loader == "device" and not self.cfg.feature_cache:
            from linft.data.gpu_augment import device_train_sources
            if self.shard is not None:
                from linft.errors import ConfigError
                raise ConfigError("loader 'device' runs in one process; use loader 'pil' with several")
            loaders = device_train_sources(self.stores, self.splits, self.device_tf, batch_size=self.cfg.batch_size,
                                           seed=derive_seed(stream, self.cfg.seed), start_step=start,
                                           device=self.device)
        else:
            loaders = train_loaders(self.inputs, self.splits, self.train_tf, batch_size=self.cfg.batch_size,
                                    seed=derive_seed(stream, self.cfg.seed), num_workers=self.cfg.workers,
                                    start_step=start)
        if self.shard is not None and stream == "train":  # one rank of several: its share
            loaders = shard_loaders(loaders, *self.shard)
        yield from zip_minibatches(loaders)

    def train_index_batches(self, start: int, stream: str = "train") -> Iterator[list[torch.Tensor]]:
        """The examples of :meth:`train_batches` without loading them: per step, one int64 tensor of
        environment-local indices per training domain (the same samplers, hence the same stream)."""
        loaders = train_loaders(self.inputs, self.splits, None, batch_size=self.cfg.batch_size,
                                seed=derive_seed(stream, self.cfg.seed), start_step=start)
        iters = [iter(loader.sampler) for loader in loaders]
        while True:
            yield [torch.tensor([i for i, _ in next(it)], dtype=torch.int64) for it in iters]

