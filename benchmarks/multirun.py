"""K runs in one vectorised step (linft.training.multirun.MultiRun) vs K sequential plain-PyTorch runs.

Tail + DropoutHead on cached trunk features, K = 8 members differing in seed, p and lr, each with
its own data order (per-member batches gathered from a pool of cached features).
  sequential  K plain PyTorch steps (tail in eval mode for BatchNorm, F.dropout, torch.optim.SGD),
              one per member: the reference
  vmap        one MultiRun.step for all K members
  vmap_lin    the same, linearized tails (jvp under vmap)   [skipped with --quick]
CPU: EfficientNet-Lite0 tail (last 3 blocks + neck, 112 px -> 192x4x4 features), batch 32.
CUDA: ResNet50 layer4 on layer3 features (224 px -> 1024x14x14), batch 128, fp32/TF32.
Ratio = median over interleaved rounds of (sequential time / vmap time) = throughput ratio; the
GPU floor is >= 4x. Usage: python benchmarks/multirun.py [--quick] [--k 8]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from _common import CPU, DEV, sync  # noqa: E402  (puts the checkout on sys.path)
from linft.models.backbones import build_backbone  # noqa: E402
from linft.core import split_network  # noqa: E402
from linft.training.multirun import Member, MultiRun, make_member_module  # noqa: E402




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(2 if CPU else torch.get_num_threads())
    if not CPU:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    arch, k, res, B = ("efficientnet_lite0.in1k", 3, 112, 32) if CPU else ("resnet50.random", 1, 224, 128)
    K, N = args.k, 4 * 32
    torch.manual_seed(0)
    model, _ = build_backbone(arch)
    sp = split_network(model, k, 7, 0.5)
    trunk = sp.trunk.to(DEV).eval()
    with torch.no_grad():
        feats = torch.cat([trunk(torch.randn(32, 3, res, res, device=DEV)) for _ in range(N // 32)])
    labels = torch.randint(0, 7, (N,), device=DEV)
    tail = sp.tail.to(DEV)
    d = sp.head.fc.in_features
    members = [Member(seed=i, p=(0.0, 0.5, 0.8, 0.9)[i % 4], lr=1e-3 * (1 + i % 3)) for i in range(K)]

    # reference: K independent plain PyTorch models + optimizers
    seq = []
    for m in members:
        net = make_member_module(tail, d, 7, m)
        net.head.train()
        seq.append((net, torch.optim.SGD(net.parameters(), lr=m.lr, momentum=0.9)))

    def sequential():
        idx = torch.randint(0, N, (K, B), device=DEV)
        for (net, opt), i in zip(seq, idx):
            loss = F.cross_entropy(net.head(net.tail(feats[i])), labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    mr = MultiRun(tail, d, 7, members, momentum=0.9)

    def vectorised(run=mr):
        idx = torch.randint(0, N, (K, B), device=DEV)
        run.step(feats[idx], labels[idx])

    rows = {"sequential": sequential, "vmap": vectorised}
    if not args.quick:
        mr_lin = MultiRun(copy.deepcopy(tail), d, 7, members, momentum=0.9, linearized=True)
        rows["vmap_lin"] = lambda: vectorised(mr_lin)
    rounds, steps = (3, 1) if args.quick else ((5, 1) if CPU else (7, 10))
    for f in rows.values():
        f()  # noqa: E702
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
    print(f"{device}, torch {torch.__version__}, {arch} tail (k={k}) on {tuple(feats.shape[1:])} features, "
          f"batch {B}, K={K}")
    for r in rows:
        ratio = statistics.median(s / t for s, t in zip(times["sequential"], times[r]))
        rec = dict(kind="bench", bench="multirun", row=r, device=device, torch=torch.__version__, K=K, batch=B,
                   ms_per_step_all_members=round(1e3 * statistics.median(times[r]), 1),
                   member_steps_per_s=round(K / statistics.median(times[r]), 2),
                   throughput_vs_sequential=round(ratio, 3))
        print(json.dumps(rec), flush=True)
    r = statistics.median(s / t for s, t in zip(times["sequential"], times["vmap"]))
    print(f"K={K} vectorised / sequential throughput: {r:.2f}x"
          + ("" if CPU else f"  (floor 4x: {'met' if r >= 4 else 'NOT met'})"))


if __name__ == "__main__":
    main()
