"""Full fine-tuning: the whole loop (batch source + augmentation + step) vs the compute-only step.

Rows, side by side in one run (interleaved rounds, median of per-round ratios to ``compute``):
  compute   plain PyTorch full fine-tuning step on a pre-made batch (the reference)
  device    DeviceBatchSource over a uint8 store (on the device) + DeviceAugment + the same step
  aug_only  the batch source + augmentation alone (no step)
  pil       the DomainBed-style loader (JPEG decode + torchvision augmentation, linft.data.loaders,
            ``--workers`` workers) + the same step
CPU: EfficientNet-Lite0 at 64 px, batch 32, fp32. CUDA: ResNet50 at 224 px, batch 128, bf16
autocast, channels_last. Floor on GPU: device >= 0.90 of compute (ratio compute/device >= 0.9).
Prints one JSON line per row, then a table. Usage: python benchmarks/loop_throughput.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import CPU, DEV, sync  # noqa: E402  (puts the checkout on sys.path)
from linft.models.backbones import build_backbone  # noqa: E402
from linft.data.gpu_augment import DeviceAugment, DeviceBatchSource  # noqa: E402
from linft.data.uint8_store import store_size  # noqa: E402




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=0 if CPU else min(16, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    torch.set_num_threads(2 if CPU else torch.get_num_threads())
    arch, res, B = ("efficientnet_lite0", 64, 32) if CPU else ("resnet50.in1k_v2", 224, 128)
    rounds, steps = (3, 2) if args.quick else ((7, 3) if CPU else (7, 10))
    if not CPU:
        torch.backends.cudnn.benchmark = True
    try:
        model, spec = build_backbone(arch)
    except Exception:  # no weights here: throughput does not depend on them
        arch = arch.split(".")[0] + ".random" if not CPU else arch
        model, spec = build_backbone(arch)
    model = model.to(DEV).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(x, y):
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=not CPU):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    S, N = store_size(res), 8 * B
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g).to(DEV)
    labels = torch.randint(0, 7, (N,), generator=g)
    aug = DeviceAugment(spec.mean, spec.std, res, channels_last=True)
    src = iter(DeviceBatchSource(images, labels, range(N), B, seed=0, transform=aug, device=DEV))
    x0, y0 = next(src)
    x0, y0 = x0.clone(), y0.clone()

    # DomainBed-style reference loader over a JPEG tree (decode + PIL augmentation per image)
    from linft.data.datasets import get_dataset
    from linft.data.loaders import train_loaders
    from linft.data.splits import make_splits
    from linft.data.synthetic import make_image_tree
    from linft.data.transforms import train_transform
    tmp = tempfile.TemporaryDirectory()
    make_image_tree(Path(tmp.name), "PACS", n_per_class=max(1, N // 12), size=int(S * 1.5), fmt="jpg")
    ds = get_dataset("PACS", Path(tmp.name))
    loader = train_loaders(ds, make_splits(ds, ["S"])[:1] + [], train_transform(spec.mean, spec.std, res),
                           batch_size=B, seed=0, num_workers=args.workers)[0]
    pil = iter(loader)

    def pil_batch():
        x, y = next(pil)
        return x.to(DEV, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(DEV)

    rows = {
        "compute": lambda: step(x0, y0),
        "device": lambda: step(*next(src)),
        "aug_only": lambda: next(src),
        "pil": lambda: step(*pil_batch()),
    }
    for f in rows.values():  # warm-up
        f(); f()  # noqa: E702
    sync()
    times = {r: [] for r in rows}
    for _ in range(rounds):
        for r, f in rows.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                f()
            sync()
            times[r].append((time.perf_counter() - t) / steps)
    device = torch.cuda.get_device_name() if not CPU else f"CPU, {torch.get_num_threads()} threads"
    out = []
    for r in rows:
        ratio = statistics.median(c / t for c, t in zip(times["compute"], times[r]))
        rec = dict(kind="bench", bench="loop_throughput", row=r, device=device, torch=torch.__version__, arch=arch,
                   res=res, batch=B, store_side=S, ms_per_step=round(1e3 * statistics.median(times[r]), 2),
                   img_per_s=round(B / statistics.median(times[r]), 1),
                   throughput_vs_compute=round(ratio, 3), rounds=[round(c / t, 3) for c, t in
                                                                  zip(times["compute"], times[r])])
        print(json.dumps(rec), flush=True)
        out.append(rec)
    print(f"\n{device}, torch {torch.__version__}, {arch} {res} px, batch {B}"
          f"{'' if CPU else ', bf16 autocast'}, channels_last, pil loader workers={args.workers}")
    print(f"{'row':<10} {'ms/step':>9} {'img/s':>8} {'vs compute':>11}")
    for rec in out:
        print(f"{rec['row']:<10} {rec['ms_per_step']:>9.1f} {rec['img_per_s']:>8.1f} {rec['throughput_vs_compute']:>11.3f}")
    floor = "" if CPU else ("  (floor 0.90: " + ("met" if out[1]["throughput_vs_compute"] >= 0.9 else "NOT met") + ")")
    print(f"loop (device) / compute-only throughput: {out[1]['throughput_vs_compute']:.3f}{floor}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
