"""Which input resolution makes Lite0's pre-trained features most useful out of domain (Digits)?
Per resolution and weights (ImageNet / random init): the head input at theta0 (trunk + last 3 blocks +
neck, pooled) for MNIST (train) and UCI optdigits (test); a multinomial logistic-regression probe
fitted on MNIST's "in" split (1000 examples, L-BFGS, L2 1e-3); i.i.d. = MNIST "out", o.o.d. = optdigits;
and the fraction of neck channels (1280 ReLU6 units) that are zero on every MNIST "out" image.
Usage: python experiments/diagnostics/resolution_scan.py [CACHE_DIR]
(output: figures/offline_study/diagnostics/resolution_scan.txt, read by paper_notes.md section 10)."""
import sys, time, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
CACHE = sys.argv[1] if len(sys.argv) > 1 else ".linft_cache"
from linft.core.heads import pool
from linft.runs.config import RunConfig
from linft.training.pipeline import build_run

def feats(b, key):
    zs, ys = [], []
    with torch.no_grad():
        for x, y in b.data.eval_loaders[key]:
            zs.append(pool(b.pipe.post(b.pipe.pre(x)))); ys.append(y)
    return torch.cat(zs).double(), torch.cat(ys)

def probe(ztr, ytr, l2=1e-3):
    mu, sd = ztr.mean(0), ztr.std(0) + 1e-6
    W = torch.zeros(ztr.shape[1], 10, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, line_search_fn="strong_wolfe")
    x = (ztr - mu) / sd
    def closure():
        opt.zero_grad(); loss = F.cross_entropy(x @ W + b, ytr) + l2 * (W ** 2).sum(); loss.backward(); return loss
    opt.step(closure)
    return lambda z: (((z - mu) / sd) @ W + b).detach()

print("res  weights  iid   ood   dead-neck-channels  seconds", flush=True)
for res in [32, 48, 64, 96]:
    for w in ("in1k", "random"):
        t0 = time.time()
        cfg = RunConfig(dataset="Digits", test_envs=("optdigits",), backbone=f"efficientnet_lite0.{w}", resolution=res,
                        augment=False, feature_cache=True, dataset_limit=2000, n_per_domain=1000, mode="probe",
                        cache_dir=CACHE, device="cpu", quiet=True)
        b = build_run(cfg)
        ztr, ytr = feats(b, ("mnist", "in")); zva, yva = feats(b, ("mnist", "out"))
        zte = torch.cat([feats(b, ("optdigits", s))[0] for s in ("in", "out")])
        yte = torch.cat([feats(b, ("optdigits", s))[1] for s in ("in", "out")])
        f = probe(ztr, ytr)
        iid = (f(zva).argmax(1) == yva).double().mean().item()
        ood = (f(zte).argmax(1) == yte).double().mean().item()
        dead = (zva.amax(0) <= 0).double().mean().item()
        print(f"{res:>3}  {w:<7} {100*iid:5.1f} {100*ood:5.1f}  {100*dead:5.1f}%  {time.time()-t0:6.0f}", flush=True)
