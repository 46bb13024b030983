"""Sweeps, collection, figures and the report on tiny real runs (issue: Experiments)."""
import json

import pytest

from linft.data.synthetic import make_image_tree
from linft.sweeps.grid import delete_incomplete, launch, load_experiment, status


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    make_image_tree(tmp / "data", "PACS", n_per_class=4, size=16)
    exp_file = tmp / "tiny.toml"
    exp_file.write_text("""
description = "tiny"
[base]
dataset = "PACS"
backbone = "tiny_resnet"
k = 2
resolution = 16
steps = 4
eval_every = 2
traj_start = 1
lr_decay_steps = [3]
batch_size = 4
lr = 0.05
[grid]
cases = [{mode = "tail"}, {mode = "linear"}]
p = [0.0, 0.9]
""")
    exp = load_experiment(str(exp_file), data_root=str(tmp / "data"))
    counts = launch(exp, tmp / "runs", jobs=2)
    return exp, tmp / "runs", counts


def test_launch_status_and_relaunch(swept):
    exp, root, counts = swept
    assert len(exp.configs) == 4
    assert counts == {"done": 4, "running": 0, "failed": 0, "missing": 0}
    again = launch(exp, root, jobs=1)  # nothing left to do
    assert again["done"] == 4
    (root / exp.configs[0].run_id / "done").unlink()
    assert len(status(exp, root)["running"]) == 1
    assert delete_incomplete(exp, root) == [exp.configs[0].run_id]
    assert len(status(exp, root)["missing"]) == 1
    launch(exp, root)
    assert len(status(exp, root)["done"]) == 4


def test_collect_tables_figures_report(swept, tmp_path):
    from linft.results import collect
    from linft.results.report import write_report
    _, root, _ = swept
    df = collect.load_rows(root)
    assert {"run", "kind", "step", "env", "role", "split", "metric", "value", "mode", "p", "seed"} <= set(df.columns)
    acc = collect.selected_accuracy(df, "train_val")
    assert set(acc["method"]) >= {"tail p=0", "tail p=0.9", "linear p=0", "linear p=0.9"}
    assert acc["ood_acc"].between(0, 1).all() and acc["iid_acc"].between(0, 1).all()
    from linft.results.report import load_study
    study = load_study(root)  # DomainBed selection (collect.domainbed_table averaged across lrs: removed)
    cells = study.tables.ood.cells
    assert "Avg" in set(cells["test_env"]) and (cells["dataset"] == "PACS").all()
    from linft.analysis.registry import analyze
    tails = sorted(str(root / c.run_id) for c in swept[0].configs if c.mode == "tail")
    analyze("interp", tails, grid=5, refine=False)
    analyze("linearity", tails[:1])
    out = write_report(root, tmp_path / "report.md")
    text = out.read_text()
    assert "o.o.d. accuracy" in text and "tiny_resnet" in text and "![iid_vs_ood]" in text
    for name in ("iid_vs_ood", "linear_vs_nonlinear", "ood_vs_dropout", "interpolation", "taylor_fidelity"):
        for ext in ("png", "pdf", "csv"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0


def test_experiments_in_repo_load():
    for name, variants in (("linear_vs_nonlinear", ("paper", "offline")),
                           ("offline_study", ("paper", "linear", "linear_p0", "random_trunk", "rates", "arms",
                                              "epochs", "demo"))):
        for variant in variants:
            exp = load_experiment(name, variant)
            assert exp.configs and len({c.run_id for c in exp.configs}) == len(exp.configs)


def test_demo_configs_are_the_documented_study():
    """The demo is the offline study's slice: its runs are the study's (same settings, one seed)."""
    from linft.cli.demo import demo_configs
    cfgs = demo_configs("/tmp/cache")
    assert set(cfgs) == {"tail p=0", "tail p=0.9", "linear p=0", "linear p=0.9"}
    assert all(c.backbone == "efficientnet_lite0.in1k" and c.dataset == "Digits" and c.resolution == 48
               and c.head_init == "probe" and not c.probe_dropout and c.steps == 1500 for c in cfgs.values())
    study = {(c.mode, c.p, c.lr, c.steps, c.probe_lr, c.k) for c in load_experiment("offline_study").configs}
    assert {(c.mode, c.p, c.lr, c.steps, c.probe_lr, c.k) for c in cfgs.values() if c.mode == "tail"} <= study
    assert len({c.run_id for c in cfgs.values()}) == len(cfgs)


def test_hparam_clouds_count_every_combination():
    import pandas as pd
    from linft.results.collect import hparam_clouds
    rows = [dict(dataset="D", method="m", test_env=e, lr=lr, weight_decay=wd, seed=s,
                 iid_acc=0.5 + 0.1 * i, ood_acc=0.1 * i + (e == "B") * 0.2)
            for e in ("A", "B") for i, (lr, wd) in enumerate([(1, 1), (1, 2), (2, 1)]) for s in (0, 1)]
    pts = hparam_clouds(pd.DataFrame(rows))
    assert len(pts) == 3 ** 2
    best = pts["ood_acc"].max()
    assert abs(best - (0.2 + 0.4) / 2) < 1e-12  # best setting in each domain: 0.2 (A) and 0.4 (B)
