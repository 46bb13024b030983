"""Data-layer throughput on this machine; prints one JSON line per measurement.

- loader: DomainBed train augmentation over a generated JPEG tree, images/s with 0 and 2 workers;
- cache_build: frozen-trunk feature extraction into the memory-mapped cache, images/s;
- tail_step: one training step of a small tail (conv + pool + linear) on cached features vs the
  frozen trunk run on the fly + the same tail, both fed by the per-domain infinite loaders
  (eval transform, no augmentation); ``ratio`` = on-the-fly time / cached time.

Usage: python benchmarks/data_loader.py [--images-per-class 25] [--res 64] [--steps 10]
Ratios are meaningful (measured side by side); absolute CPU numbers only describe this machine.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from linft.models.backbones import TinyResNet
from linft.data.datasets import get_dataset
from linft.data.feature_cache import FeatureCache, cache_environments, module_hash
from linft.data.loaders import train_loaders, zip_minibatches
from linft.data.splits import make_splits
from linft.data.synthetic import make_image_tree
from linft.data.transforms import eval_transform, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def emit(**row):
    print(json.dumps({"kind": "bench", **row}), flush=True)


def trunk_and_tail():
    torch.manual_seed(0)
    net = TinyResNet(widths=(16, 32, 64, 64), blocks=(1, 1, 1, 1)).eval()
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3).eval()
    tail = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 3))
    return trunk, tail


def time_loader(ds, splits, transform, workers, batches):
    it = zip_minibatches(train_loaders(ds, splits, transform, batch_size=32, seed=0, num_workers=workers))
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(len(x) for _ in range(batches) for x, _ in next(it))
    return n / (time.perf_counter() - t0)


def time_steps(loaders, tail, trunk, steps):
    opt = torch.optim.SGD(tail.parameters(), lr=0.01, momentum=0.9)
    it = zip_minibatches(loaders)

    def step():
        batch = next(it)
        x, y = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
        if trunk is not None:
            with torch.no_grad():
                x = trunk(x)
        loss = nn.functional.cross_entropy(tail(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(y)

    step()  # warm-up
    t0 = time.perf_counter()
    n = sum(step() for _ in range(steps))
    dt = time.perf_counter() - t0
    return dt / steps, n / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-per-class", type=int, default=25)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_image_tree(tmp / "data", "PACS", classes=("dog", "horse", "person"),
                        n_per_class=args.images_per_class, size=96, fmt="jpg")
        ds = get_dataset("PACS", tmp / "data")
        n_images = sum(len(e) for e in ds.envs)
        splits = make_splits(ds, ["S"])
        aug = train_transform(MEAN, STD, args.res)
        for workers in (0, 2):
            ips = time_loader(ds, splits, aug, workers, args.batches)
            emit(name="loader", augment=True, num_workers=workers, res=args.res, batch=32, domains=3,
                 images=n_images, metric="images_per_s", value=round(ips, 1))

        trunk, tail = trunk_and_tail()
        cache = FeatureCache(tmp / "cache", batch_size=64)
        with torch.no_grad():  # warm-up: first calls pay for kernel selection
            trunk(torch.randn(64, 3, args.res, args.res))
        t0 = time.perf_counter()
        cached = cache_environments(cache, trunk, ds, backbone="tiny_resnet.bench", weights=module_hash(trunk),
                                    split="layer3", resolution=args.res, mean=MEAN, std=STD)
        dt = time.perf_counter() - t0
        shape = list(cached["A"].features.shape[1:])
        emit(name="cache_build", res=args.res, feature_shape=shape, images=n_images, metric="images_per_s",
             value=round(n_images / dt, 1))

        plain = eval_transform(MEAN, STD, args.res)
        state = {k: v.clone() for k, v in tail.state_dict().items()}
        t_cached, ips_cached = time_steps(train_loaders(cached, splits, None, batch_size=32, seed=0), tail, None,
                                          args.steps)
        tail.load_state_dict(state)
        t_fly, ips_fly = time_steps(train_loaders(ds, splits, plain, batch_size=32, seed=0), tail, trunk,
                                    args.steps)
        emit(name="tail_step", variant="cached", res=args.res, batch=96, metric="s_per_step", value=round(t_cached, 5),
             images_per_s=round(ips_cached, 1))
        emit(name="tail_step", variant="on_the_fly", res=args.res, batch=96, metric="s_per_step",
             value=round(t_fly, 5), images_per_s=round(ips_fly, 1))
        emit(name="tail_step", variant="ratio", res=args.res, metric="on_the_fly_over_cached",
             value=round(t_fly / t_cached, 2))


if __name__ == "__main__":
    main()
