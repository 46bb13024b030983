"""Why LP-FT tail fine-tuning at p=0.9 first loses i.i.d. accuracy (Lite0 on Digits, 32 px).

Four arms, 250 steps each, the trainer's optimizer (SGD momentum 0.9, wd 1e-4, head lr x1) on cached
trunk features: p=0.9 at lr 1e-3 (probe trained under p=0.9, as linft does), the same with the
probe trained at p=0, p=0 at lr 1e-3, p=0.9 at lr 1e-4. Every 25 steps: i.i.d. accuracy (MNIST
"out" split, first 256), the mean training loss, the fraction of the neck's last ReLU6 outputs at 0
or 6, the fraction of its 1280 channels that are zero on every image of that batch ("dead"), and
|theta_tail - theta0|. Usage: python experiments/diagnostics/early_dip.py [CACHE_DIR]
(paper_notes.md section 10 reads its output: figures/offline_study/diagnostics/early_dip.txt)."""
import sys, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
CACHE = sys.argv[1] if len(sys.argv) > 1 else ".linft_cache"
from linft.runs.config import RunConfig
from linft.training.pipeline import build_run, probe_head
from linft.training.trainer import _optimizer

def cfg(p, lr, probe_p=None):
    return RunConfig(dataset="Digits", test_envs=("optdigits",), backbone="efficientnet_lite0.in1k", resolution=32,
                     augment=False, feature_cache=True, dataset_limit=2000, n_per_domain=1000, mode="tail", head_init="probe",
                     steps=2500, lr_decay_steps=(2000,), eval_every=125, traj_start=125, p=p, lr=lr,
                     cache_dir=CACHE, device="cpu", quiet=True)

def acts(pipe):
    """hook the last ReLU6 of the tail (neck) to read its saturation."""
    store = {}
    last = [m for m in pipe.split.tail.modules() if isinstance(m, (nn.ReLU6, nn.ReLU, nn.Hardtanh))][-1]
    last.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    return store

def run(p, lr, probe_p, steps=250):
    c = cfg(p, lr)
    torch.manual_seed(c.seed)
    b = build_run(c)
    pipe, data = b.pipe, b.data
    if probe_p is not None:
        pipe.head.p = probe_p
    torch.manual_seed(c.seed)
    probe_head(c, data, pipe, b.device)
    pipe.head.p = p
    store = acts(pipe)
    tail0 = {n: t.detach().clone() for n, t in pipe.split.tail.named_parameters()}
    opt = _optimizer(c, pipe)
    stream = data.train_batches(0, "train")
    ev = next(iter(data.eval_loaders[("mnist", "out")]))
    def evaluate():
        pipe.trainable.eval()
        with torch.no_grad():
            lg = pipe.trainable(ev[0]); a = store["a"]
        pipe.trainable.train()
        sat = ((a <= 0) | (a >= 6)).float().mean().item()
        dead = (a.amax(dim=(0, 2, 3)) <= 0).float().mean().item()
        d = sum(((t - tail0[n]) ** 2).sum() for n, t in pipe.split.tail.named_parameters()).sqrt().item()
        return (lg.argmax(1) == ev[1]).float().mean().item(), sat, dead, d
    pipe.trainable.train()
    out = []
    run_loss = 0
    for s in range(steps + 1):
        if s % 25 == 0:
            acc, sat, dead, d = evaluate()
            out.append(f"  step {s:4d} iid {acc:.3f} train-loss {run_loss/25 if s else float('nan'):.3f} neck sat {sat:.3f} dead ch {dead:.3f} |dtail| {d:.3f}")
            run_loss = 0
        if s == steps:
            break
        bs = next(stream)
        x = torch.cat([q[0] for q in bs]); y = torch.cat([q[1] for q in bs])
        loss = F.cross_entropy(pipe.trainable(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); run_loss += loss.item()
    return out

for p, lr, probe_p in [(0.9, 1e-3, None), (0.9, 1e-3, 0.0), (0.0, 1e-3, None), (0.9, 1e-4, None)]:
    print(f"p={p} lr={lr} probe trained at p={probe_p if probe_p is not None else p}", flush=True)
    for line in run(p, lr, probe_p):
        print(line, flush=True)
