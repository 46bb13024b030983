"""`linft demo` (what `make demo` runs): a small but real version of the study, offline, on the
embedded default -- real ImageNet EfficientNet-Lite0 weights, MNIST (training domain) -> UCI
optdigits (test domain), 32 px:

1. tail and linearized-tail fine-tuning at p = 0 and p = 0.9 (frozen-trunk features cached once),
   full fine-tuning at p = 0 and p = 0.9 (short: 150 steps on 2 CPU cores), each with its
   trajectory weight average and trajectory ensemble;
2. the linearity analyses: weight distances, interpolation (pre-trained -> fine-tuned and
   p=0 <-> p=0.9; p=0.9 from the pre-trained weights) with barriers, function-vs-weight interpolation, post-hoc Taylor fidelity,
   trained linear-vs-standard agreement, kernel distance, the linear-model identities;
3. a dataset-size trend over 3 nested sizes (100, 300, 800 examples);
4. the report (markdown, tables, figures) in ``--out``.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from linft.runs.config import RunConfig


NTK_PROBE = 32  # examples in the kernel's probe batch (a [32, 32] trace NTK of ~2M tail parameters)
OPTIONS = {"ntk": {"probe_size": NTK_PROBE}, "identity": {"grid": 11}}


def demo_configs(cache_dir: str) -> dict[str, RunConfig]:
    base = RunConfig(dataset="Digits", test_envs=("optdigits",), backbone="efficientnet_lite0.in1k", resolution=32,
                     augment=False, dataset_limit=1000, n_per_domain=800, steps=300, lr=1e-3, lr_decay_steps=(200,),
                     eval_every=100, traj_start=100, batch_size=32, cache_dir=cache_dir)
    runs = {f"{m} p={p:g}": base.replace(mode=m, p=p, feature_cache=True) for m in ("tail", "linear") for p in (0.0, 0.9)}
    runs.update({f"full p={p:g}": base.replace(mode="full", p=p, steps=150, lr_decay_steps=(100,), eval_every=50,
                                               traj_start=50) for p in (0.0, 0.9)})
    runs.update({f"{m} p=0.9 n={n}": base.replace(mode=m, p=0.9, feature_cache=True, n_per_domain=n)
                 for m in ("tail", "linear") for n in (100, 300)})
    return runs


def run_demo(out: str | Path = "linft-demo", figures: str | Path | None = None) -> Path:
    from linft.analysis.registry import analyze
    from linft.results.report import write_report
    from linft.training.launch import train
    t0 = time.perf_counter()
    out = Path(out)
    root = out / "runs"
    configs = demo_configs(str(out / "cache"))

    def stage(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    paths = {}
    for i, (name, cfg) in enumerate(configs.items(), 1):
        stage(f"run {i}/{len(configs)}: {name} ({cfg.mode}, p={cfg.p}, n={cfg.n_per_domain}, {cfg.steps} steps)")
        paths[name] = train(cfg, root).path
    p0, p9, l0, l9 = paths["tail p=0"], paths["tail p=0.9"], paths["linear p=0"], paths["linear p=0.9"]
    jobs = [("distance", [p0, p9]), ("interp", [p9]), ("interp", [p0, p9]),
            ("funcinterp", [p0, p9]), ("linearity", [p0]), ("linearity", [p9]), ("linearity", [l0, p0]),
            ("linearity", [l9, p9]), ("ntk", [p0]), ("ntk", [p9]), ("identity", [l0, l9]), ("identity", [p0, p9])]
    for kind, runs in jobs:
        stage(f"analysis {kind}: {' vs '.join(Path(r).name for r in runs)}")
        analyze(kind, runs, **OPTIONS.get(kind, {}))
    stage("dataset-size trend (n = 100, 300, 800; tail at p = 0.9, and distances of the linear runs)")
    analyze("trend", [paths["tail p=0.9 n=100"], paths["tail p=0.9 n=300"], p9], probe_size=NTK_PROBE)
    analyze("trend", [paths["linear p=0.9 n=100"], paths["linear p=0.9 n=300"], l9], kinds=("distance",))
    stage("report and figures")
    report = write_report(root, out / "report.md", figures or out / "figures",
                          title="linft demo: EfficientNet-Lite0 (ImageNet), MNIST -> UCI optdigits")
    _tables(root, out)
    stage(f"done: {report}")
    return report


def _tables(root: Path, out: Path) -> None:
    """The demo's small result tables (CSV): selected accuracies and the analyses' headline rows."""
    from linft.results import collect
    df = collect.load_rows(root)
    collect.selected_accuracy(df, "train_val").to_csv(out / "accuracy.csv", index=False)
    heads = df[df["kind"].isin(["distance", "interp", "linearity", "ntk", "identity", "trend"])
               & (df["env"].isin(["pooled"]) | df["env"].isna())]
    heads.dropna(axis=1, how="all").to_csv(out / "analyses.csv", index=False)


def _main(args) -> int:
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(Path(args.out))
    run_demo(args.out, args.figures)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="the offline study on the embedded default (EfficientNet-Lite0, MNIST -> optdigits)")
    p.add_argument("--out", default="linft-demo", help="output folder (runs, cache, report.md, figures/)")
    p.add_argument("--figures", default=None, help="where figures go (default: OUT/figures)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first (otherwise finished work is reused)")
    p.set_defaults(func=_main)
