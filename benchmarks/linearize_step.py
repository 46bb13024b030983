"""Linearized tail training step vs a standard one, side by side in one run.

Rows, for the ResNet50 tail (layer4 + DropoutHead on cached layer3 features, resnet50.random) and the
EfficientNet-Lite0 tail (last 3 blocks + neck, real weights), batch 32, p = 0.9, SGD momentum 0.9:
  std      standard tail step (plain PyTorch: tail in eval mode for BN, F.dropout in the head)
  jvp      naive linearized step, LinearizedModule(engine="jvp") (torch.func.jvp)
  onepass  LinearizedModule(engine="onepass") (hand-written primal/tangent streams)
  cached   one-pass with the primal activations at theta0 cached per example (PrimalCache)
Every step draws a random batch of 32 from a pool of N cached trunk features (the gather is in
every row). Timing: warm-up, then R rounds; each round times S steps of every row in turn
(interleaved, so machine noise hits all rows alike); the median over rounds is reported.
Ratios: median over rounds of (row time / std time in the same round), robust to bursts of machine
noise. Peak memory: CUDA max_memory_allocated; on CPU each row runs again in a fresh subprocess and
the RSS high-water mark of 3 steps is reported, with the tail's parameters counted in every row (the
linearized rows hold theta and theta0 and release the source module), glibc set to map every large
allocation so that RSS follows live bytes. On CPU the ResNet50 rows are also measured at the issue's
GPU shape (224 px, batch 128), where activations rather than parameters dominate.
Prints one JSON line per measurement, then a table.
Usage: python benchmarks/linearize_step.py [resnet50_layer4] [lite0_k3]
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _common import CPU, DEV, sync  # noqa: E402  (puts the checkout on sys.path)
from linft.models.backbones import build_backbone  # noqa: E402
from linft.core import freeze_batchnorm, linearize, split_network  # noqa: E402
from linft.core.tangent import build_primal_cache  # noqa: E402

B, P, NCLS = 32, 0.9, 7
N = 4 * B  # pool of cached examples the batches are drawn from
ROWS = ("std", "jvp", "onepass", "cached")
TAILS = {  # name: (backbone, k, resolution on CPU, on CUDA)
    "resnet50_layer4": ("resnet50.random", 3, 112, 224),
    "lite0_k3": ("efficientnet_lite0.in1k", 3, 112, 224),
}
MEMFMT = torch.channels_last  # the faster layout for the standard step too (CPU and CUDA)



def setup(tail_name: str, seed: int = 0):
    torch.manual_seed(seed)
    arch, k, res_cpu, res_gpu = TAILS[tail_name]
    res = res_cpu if CPU else res_gpu
    model, _ = build_backbone(arch)
    split = split_network(model, k, NCLS, P)
    trunk = split.trunk.to(DEV).eval().to(memory_format=MEMFMT)
    with torch.no_grad():
        feats = torch.cat([trunk(torch.randn(B, 3, res, res, device=DEV).contiguous(memory_format=MEMFMT))
                           for _ in range(N // B)])
    feats = feats.contiguous(memory_format=MEMFMT)
    labels = torch.randint(0, NCLS, (N,), device=DEV)
    th = split.tail_head().to(DEV).to(memory_format=MEMFMT)
    freeze_batchnorm(th)
    return th, feats, labels, res


def make_step(row: str, th, feats, labels):
    """A closure doing one training step of ``row``; returns (step, extra info)."""
    info = {}
    if row == "std":
        net = th.train()  # BatchNorm frozen (eval) by freeze_batchnorm; the head's F.dropout active
        params, fwd = net.parameters(), (lambda idx: net(feats[idx]))
    else:
        lin = linearize(th, engine="jvp" if row == "jvp" else "onepass").train()
        params = lin.parameters()
        if row == "cached":
            t = time.perf_counter()
            cache = build_primal_cache(lin, feats)
            info.update(cache_build_s=round(time.perf_counter() - t, 3), cache_bytes=cache.nbytes,
                        cache_bytes_per_example=round(cache.bytes_per_example))
            fwd = cache
        else:
            fwd = (lambda idx: lin(feats[idx]))
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        idx = torch.randint(0, N, (B,), device=DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=not CPU):
            loss = F.cross_entropy(fwd(idx), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, info


def time_rows(tail_name: str, rounds: int, steps: int):
    th, feats, labels, res = setup(tail_name)
    made = {r: make_step(r, th, feats, labels) for r in ROWS}
    for r in ROWS:
        for _ in range(2):
            made[r][0]()
    times = {r: [] for r in ROWS}
    peaks = {}
    for _ in range(rounds):
        for r in ROWS:
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                made[r][0]()
            sync()
            times[r].append((time.perf_counter() - t) / steps)
            if DEV == "cuda":
                peaks[r] = torch.cuda.max_memory_allocated()
    return times, {r: made[r][1] for r in ROWS}, peaks, res, tuple(feats.shape[1:])


def cpu_peak(tail_name: str, row: str, shape: str = "cpu") -> tuple[int, int]:
    """Peak RSS growth (bytes) of running ``row`` in a fresh process over its common setup, plus the
    tail's own parameters (they exist in every row: trained in 'std', the expansion source otherwise)."""
    # every allocation over 64 KiB gets its own mapping, returned to the OS when freed: RSS then tracks
    # live tensor bytes (glibc's default keeps freed heap, so fragmentation would inflate the peak)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--mem", tail_name, row, shape], capture_output=True,
                         text=True, check=True, env=env)
    total, cache = out.stdout.strip().splitlines()[-1].split()
    return int(total), int(cache)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _mem_child(tail_name: str, row: str, shape: str = "cpu") -> None:
    """Peak memory of 3 training steps of ``row``, everything the step holds included: the tail's
    parameters (for linearized rows: theta and theta0; the source module is released, as the trainer
    does), gradients, momentum, the primal cache if any, activations and temporaries. Measured as the
    RSS high-water mark over the steps (reset via /proc/self/clear_refs "5" after building the row,
    so one-off construction peaks are not counted) minus the RSS before the tail existed."""
    torch.set_num_threads(2)
    global B, N
    if shape == "gpu":  # the GPU shape (224 px, batch 128), measured on the CPU allocator
        B, N = 128, 128
        TAILS[tail_name] = TAILS[tail_name][:2] + (TAILS[tail_name][3],) * 2
    th, feats, labels, _ = setup(tail_name)
    param_bytes = sum(p.numel() * p.element_size() for p in th.parameters())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS") * 1024 - param_bytes  # as if the tail did not exist yet
    step, info = make_step(row, th, feats, labels)
    del th  # linearized rows hold their own copies; 'std' keeps its module through the step closure
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    print(_status_kib("VmHWM") * 1024 - base, info.get("cache_bytes", 0))


def gpu_shape_memory(tail_name: str = "resnet50_layer4") -> None:
    """Peak memory at the issue's GPU shape (224 px, batch 128), measured on the CPU allocator: what
    activations cost there (at the reduced CPU shape parameter-sized state dominates)."""
    res = {r: cpu_peak(tail_name, r, "gpu") for r in ROWS}
    std = res["std"][0]
    for r in ROWS:
        total, cache = res[r]
        rec = dict(kind="bench_mem", tail=tail_name, row=r, shape="224px_batch128", device="cpu allocator",
                   peak_mib=round(total / 2**20, 1), mem_ratio=round(total / std, 3),
                   cache_mib=round(cache / 2**20, 1), mem_ratio_without_cache=round((total - cache) / std, 3))
        print(json.dumps(rec), flush=True)


def main(tails=tuple(TAILS)) -> None:
    torch.set_num_threads(2)
    if not CPU:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = torch.cuda.get_device_name() if not CPU else f"CPU, {torch.get_num_threads()} threads"
    rounds = 9
    table = []
    for tail_name in tails:
        steps = (2 if "resnet" in tail_name else 6) if CPU else 20
        times, infos, peaks, res, fshape = time_rows(tail_name, rounds, steps)
        if CPU:
            peaks = {r: cpu_peak(tail_name, r)[0] for r in ROWS}
        med = {r: statistics.median(v) for r, v in times.items()}
        for r in ROWS:
            rec = dict(kind="bench", tail=tail_name, row=r, device=device, torch=torch.__version__, batch=B, p=P,
                       res=res, input=list(fshape), ms_per_step=round(1e3 * med[r], 2),
                       ratio=round(statistics.median(a / b for a, b in zip(times[r], times["std"])), 3),
                       ratio_of_min=round(min(times[r]) / min(times["std"]), 3),
                       ratio_rounds=[round(a / b, 3) for a, b in zip(times[r], times["std"])],
                       peak_mib=round(peaks[r] / 2**20, 1), mem_ratio=round(peaks[r] / max(peaks["std"], 1), 2),
                       **infos[r])
            print(json.dumps(rec), flush=True)
            table.append(rec)
    if CPU and "resnet50_layer4" in tails:
        gpu_shape_memory()
    mem = "peak mem (CUDA max allocated)" if not CPU else "peak RSS of the step, fresh process"
    print(f"\n{device}, torch {torch.__version__}, batch {B}, p={P}, SGD momentum; "
          f"{'CPU: reduced resolution, ' if CPU else ''}memory: {mem}")
    print(f"{'tail':<16} {'res':>4} {'input':<14} {'row':<8} {'ms/step':>9} {'ratio':>6} {'(min)':>6} "
          f"{'peak MiB':>9} {'mem ratio':>9}  cache")
    for t in table:
        cache = (f"{t['cache_bytes'] / 2**20:.0f} MiB for N={N} ({t['cache_bytes_per_example'] / 2**10:.0f} KiB/ex)"
                 if "cache_bytes" in t else "")
        print(f"{t['tail']:<16} {t['res']:>4} {'x'.join(map(str, t['input'])):<14} {t['row']:<8} "
              f"{t['ms_per_step']:>9.1f} {t['ratio']:>6.2f} {t['ratio_of_min']:>6.2f} {t['peak_mib']:>9.1f} {t['mem_ratio']:>9.2f}  {cache}")


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--mem":
        _mem_child(*sys.argv[2:])
    else:  # optional arguments: a subset of the tails, e.g. resnet50_layer4
        main(tuple(sys.argv[1:]) or tuple(TAILS))
