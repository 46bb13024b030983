"""Redraw this folder's accuracy figures from its accuracy.csv (per run and model: the step chosen
by training-domain validation, its i.i.d. and o.o.d. accuracy) without re-running the sweep.

The sweep has one hyperparameter setting (lr 1e-3, weight decay 1e-4) and one test domain, so
DomainBed's training-domain validation reduces to each run's own choice of step (earliest best
mean accuracy on the training domain's held-out split, the rule of linft.training.selection),
which is what accuracy.csv records; the figures average only the 3 seeds of each method.

    PYTHONPATH=. python figures/linear_vs_nonlinear_offline/regenerate.py
"""
from pathlib import Path

import pandas as pd

from linft.results import plots
from linft.results.selection_frames import seed_mean
from linft.sweeps.grid import load_experiment

HERE = Path(__file__).parent


def main() -> None:
    acc = pd.read_csv(HERE / "accuracy.csv")
    configs = {c.run_id: c for c in load_experiment("linear_vs_nonlinear", "offline").configs}
    assert set(acc["run"]) <= set(configs), "accuracy.csv holds runs of another sweep"
    runs = pd.DataFrame([{"dataset": c.dataset, "test_envs": c.test_envs, "backbone": c.backbone,
                          "steps": c.steps, "seed": c.seed} for r, c in configs.items() if r in set(acc["run"])])
    prov = plots.provenance(runs)
    points = acc.assign(setting="lr=0.001, weight_decay=0.0001",
                        trial=[f"trial_seed={t} seed={s}" for t, s in zip(acc["trial_seed"], acc["seed"])])
    palette = plots.method_palette(list(points["method"].unique()))
    plots.iid_vs_ood(seed_mean(points, ["method", "dataset", "setting"]), HERE, palette, prov)
    m = seed_mean(points, ["method", "dataset"])
    avgs = pd.concat([m.assign(accuracy=what, mean=m[col], se=m[col + "_se"])
                      for what, col in (("i.i.d.", "iid_acc"), ("o.o.d.", "ood_acc"))], ignore_index=True)
    avgs = avgs[["accuracy", "method", "dataset", "mean", "se", "n"]]
    plots.accuracy_by_mode(avgs, HERE, palette, prov)
    ood = avgs[avgs["accuracy"] == "o.o.d."].copy()
    ood["p"] = ood["method"].str.extract(r" p=([0-9.]+)")[0].astype(float)
    ood["base"] = ood["method"].str.replace(r" p=[0-9.]+", "", regex=True)
    plots.ood_vs_dropout(ood, HERE, palette, prov)
    for f in HERE.glob("*.pdf"):  # the committed folder keeps PNG + CSV only
        f.unlink()


if __name__ == "__main__":
    main()
