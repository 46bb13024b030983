"""linft's own training loop (``linft.training.trainer``) against plain-PyTorch compute-only steps, same run.

Every row is a real ``Trainer`` run on a generated PACS-shaped JPEG tree (3 training domains,
so a step sees 3 x ``--batch`` images) whose throughput is the run's own ``img_per_s`` row: the
training loop with its data path included, the step-0 and final evaluations excluded. Stores and
feature caches are built by a first, untimed run.

  full/compute       plain PyTorch full fine-tuning step on one pre-made batch (the reference)
  full/pil           Trainer, mode full, DomainBed's PIL/torchvision loader (``--workers``)
  full/device        Trainer, mode full, loader="device" (uint8 store + batched augmentation)
  tail/compute       plain PyTorch tail step (layer4-style tail + dropout head) on cached features
  tail/trainer       Trainer, mode tail, feature cache
  linear/trainer     Trainer, mode linear (one-pass engine), feature cache
  linear/primal      Trainer, mode linear, lin_primal_cache=true
Ratios: full rows vs full/compute (throughput, the issue's ">= 0.90 on a GPU"); tail and linear
rows vs tail/trainer (step-time ratio, the issue's "linearized step <= 1.5x a tail step").
CPU: EfficientNet-Lite0 (real weights), 64 px for full / 112 px for the tail rows, batch 16 per
domain, fp32. CUDA: ResNet50 (random init if no weights), 224 px, batch 43 per domain (~128 a step),
bf16 autocast. Usage: python benchmarks/trainer_throughput.py [--quick] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import CPU, DEV, sync  # noqa: E402  (puts the checkout on sys.path)
from linft.models.backbones import build_backbone  # noqa: E402
from linft.runs.config import RunConfig  # noqa: E402
from linft.core import freeze_batchnorm, split_network  # noqa: E402
from linft.data.synthetic import make_image_tree  # noqa: E402
from linft.training.launch import train  # noqa: E402




def compute_only(arch: str, res: int, batch: int, steps: int, mode: str, k: int, p: float) -> float:
    """img/s of a plain step on a fixed batch: the whole network (full) or the tail on trunk features."""
    model, _ = build_backbone(arch)
    sp = split_network(model, k, 7, p)
    for part in (sp.trunk, sp.tail, sp.head):
        freeze_batchnorm(part)
    x = torch.randn(batch, 3, res, res, device=DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=DEV)
    if mode == "full":
        net = sp.full().to(DEV).to(memory_format=torch.channels_last).train()
    else:
        trunk = sp.trunk.to(DEV).eval()
        with torch.no_grad():
            x = trunk(x)
        net = sp.tail_head().to(DEV).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=not CPU):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t)


def trainer_img_per_s(cfg: RunConfig, root: Path) -> float:
    rd = train(cfg, root)
    rows = [r for r in rd.read_rows() if r.get("metric") == "img_per_s"]
    return rows[-1]["value"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=0 if CPU else min(16, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    torch.set_num_threads(2 if CPU else torch.get_num_threads())
    arch, res_full, res_tail, batch = (("efficientnet_lite0.in1k", 64, 112, 16) if CPU else
                                       ("resnet50.in1k_v2", 224, 224, 43))
    try:
        build_backbone(arch)
    except Exception:  # no weights here: throughput does not depend on them
        arch = arch.split(".")[0] + ".random"
    steps = (6 if args.quick else 20) if CPU else (30 if args.quick else 100)
    tmp = tempfile.TemporaryDirectory()
    data = Path(tmp.name) / "data"
    make_image_tree(data, "PACS", classes=tuple(f"c{i}" for i in range(7)), n_per_class=4 if CPU else 40,
                    size=int(res_full * 1.5), fmt="jpg")
    common = dict(dataset="PACS", data_root=str(data), cache_dir=str(Path(tmp.name) / "cache"), backbone=arch,
                  batch_size=batch, quiet=True, device=DEV, workers=args.workers, lr_decay_steps=(10**6,),
                  traj_start=10**6, test_envs=("A",), p=0.5)
    n_img = 3 * batch
    rows = []

    def record(group, row, img_s, ref, what):
        rec = dict(kind="bench", bench="trainer_throughput", group=group, row=row, device=device, torch=torch.__version__,
                   arch=arch, batch_per_domain=batch, step_images=n_img, img_per_s=round(img_s, 1),
                   ratio=round(img_s / ref if what == "throughput" else ref / img_s, 3), ratio_is=what)
        print(json.dumps(rec), flush=True)
        rows.append(rec)

    device = torch.cuda.get_device_name() if not CPU else f"CPU, {torch.get_num_threads()} threads"
    # full fine-tuning: the loop with its data path vs the compute-only step
    full = dict(common, mode="full", k=3, resolution=res_full, steps=steps, eval_every=steps)
    ref = compute_only(arch, res_full, n_img, steps, "full", 3, 0.5)
    record("full", "compute", ref, ref, "throughput")
    for loader in ("pil", "device"):
        cfg = RunConfig(**full, loader=loader)
        train(cfg.replace(steps=2, eval_every=2, seed=99), Path(tmp.name) / "warm")  # builds the store
        record("full", loader, trainer_img_per_s(cfg, Path(tmp.name) / "runs"), ref, "throughput")
    # tail vs linearized tail, on cached trunk features
    tail = dict(common, k=3, resolution=res_tail, steps=steps, eval_every=steps, augment=False, feature_cache=True)
    ref = compute_only(arch, res_tail, n_img, steps, "tail", 3, 0.5)
    record("tail", "compute", ref, ref, "throughput")
    train(RunConfig(**dict(tail, mode="tail", steps=2, eval_every=2, seed=99)), Path(tmp.name) / "warm")
    base = trainer_img_per_s(RunConfig(**tail, mode="tail"), Path(tmp.name) / "runs")
    record("tail", "trainer", base, base, "step_time")
    record("linear", "trainer", trainer_img_per_s(RunConfig(**tail, mode="linear"), Path(tmp.name) / "runs"),
           base, "step_time")
    record("linear", "primal", trainer_img_per_s(RunConfig(**tail, mode="linear", lin_primal_cache=True),
                                                 Path(tmp.name) / "runs2"), base, "step_time")
    print(f"\n{device}, torch {torch.__version__}, {arch}, {n_img} images a step (3 domains x {batch}), "
          f"{steps} steps a row; full at {res_full} px, tail/linear at {res_tail} px on cached features")
    print(f"{'row':<16} {'img/s':>8} {'ratio':>7}  meaning")
    for r in rows:
        meaning = ("img/s vs full/compute" if r["group"] == "full" else
                   "img/s vs tail/compute" if r["row"] == "compute" else "step time vs tail/trainer")
        print(f"{r['group'] + '/' + r['row']:<16} {r['img_per_s']:>8.1f} {r['ratio']:>7.3f}  {meaning}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
