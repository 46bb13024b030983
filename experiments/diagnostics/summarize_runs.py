"""Training curves (i.i.d., o.o.d., training loss every 250 steps) of the runs under a root, from their rows."""
import json, glob, sys
print("LP-FT tail fine-tuning, Lite0 (ImageNet) on Digits at 32 px, n=1000 MNIST/domain, batch 32, 2500 steps, lr x0.1 at 2000, seed 0")
print("i.i.d. = MNIST out split, o.o.d. = optdigits in split (%), model = current; train loss = mean over the last 125 steps")
for d in sorted(glob.glob(sys.argv[1] + "/*/")):
    cfg = json.load(open(d + "config.json"))
    rows = [json.loads(l) for l in open(d + "results.jsonl") if l.strip()]
    ev = {}
    for r in rows:
        if r["kind"] == "eval" and r["model"] == "current" and r["metric"] == "acc":
            ev.setdefault(r["step"], {})[(r["role"], r["split"])] = r["value"]
    tl = {r["step"]: r["value"] for r in rows if r["kind"] == "train" and r["metric"] == "loss"}
    print(f"\np={cfg['p']} lr={cfg['lr']}  ({d.rstrip('/').split('/')[-1]})")
    print("step   " + " ".join(f"{s:>5}" for s in sorted(ev) if s % 250 == 0))
    print("iid    " + " ".join(f"{100*ev[s][('train','out')]:5.1f}" for s in sorted(ev) if s % 250 == 0))
    print("ood    " + " ".join(f"{100*ev[s][('test','in')]:5.1f}" for s in sorted(ev) if s % 250 == 0))
    print("loss   " + " ".join(f"{tl.get(s, float('nan')):5.2f}" for s in sorted(ev) if s % 250 == 0))
