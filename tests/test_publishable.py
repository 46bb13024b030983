"""Numbers a researcher can publish: DomainBed selection wired into linft's tables, one identity
per run, intervals over seeds only, figures that say what they show, bad input in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from linft.runs.config import RunConfig

DOMAINBED_SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"
ENVS = ("A", "C", "P", "S")


def fake_run(root: Path, acc, done: bool = True, steps=(0, 2, 4), **cfg) -> str:
    """A finished linft run folder without training: ``acc(env, split, step) -> fraction``."""
    c = RunConfig(**{"dataset": "PACS", "backbone": "tiny_resnet", "mode": "tail", "steps": 4, **cfg})
    folder = root / c.run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(c.to_dict()))
    rows = [dict(run=c.run_id, kind="eval", step=s, model="current", env=e,
                 role="test" if e in c.test_envs else "train", split=sp, metric="acc", value=acc(e, sp, s))
            for s in steps for e in ENVS for sp in ("in", "out")]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (folder / "done").write_text("")
    return c.run_id


def two_lr_sweep(root: Path) -> Path:
    """2 lrs x 2 seeds, test env A: lr=0.01 scores ~80% everywhere, lr=0.1 ~20%."""
    for lr, level in ((0.01, 0.8), (0.1, 0.2)):
        for seed in (0, 1):
            fake_run(root, lambda e, sp, s, level=level, seed=seed: level + 0.02 * seed, lr=lr, seed=seed)
    return root


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "linft.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _study(root, **kw):
    from linft.results.report import load_study
    return load_study(root, **kw)


def _cell(res, selection, method, test_env="A"):
    c = res.cells
    r = c[(c["selection"] == selection) & (c["method"] == method) & (c["test_env"] == test_env)]
    return r


def test_two_learning_rates_are_selected_never_averaged(tmp_path):
    s = _study(two_lr_sweep(tmp_path / "runs"))
    tdv = _cell(s.tables.ood, "training_domain_validation", "tail p=0")
    assert len(tdv) == 1 and tdv["mean"].iloc[0] == pytest.approx(81.0) and tdv["n"].iloc[0] == 2
    assert tdv["se"].iloc[0] == pytest.approx(100 * pd.Series([0.80, 0.82]).std(ddof=0) / 2 ** 0.5)
    zb = s.tables.ood.cells.query("selection == 'zb_no_selection' and test_env == 'A'")
    assert dict(zip(zb["row"], zb["mean"].round(6))) == {"tail p=0 [lr=0.01]": 81.0, "tail p=0 [lr=0.1]": 21.0}
    assert (zb["n"] == 2).all()


def test_report_leads_with_summary_and_states_each_rule(tmp_path):
    root = two_lr_sweep(tmp_path / "runs")
    fake_run(root, lambda e, sp, s: 0.5, mode="full", lr=0.01)
    fake_run(root, lambda e, sp, s: 0.6, mode="linear", lr=0.01)
    r = run_cli("report", "--root", str(root), "--out", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r.md").read_text()
    assert text.index("## Summary") < text.index("## o.o.d. accuracy")
    summary = text[text.index("## Summary"):text.index("Selection rules")]
    rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and "p=" in line]
    assert rows == ["full p=0", "tail p=0", "linear p=0"]  # method families in order
    assert "81.0 ± 0.7 (n=2)" in summary  # np.std([80, 82]) / sqrt(2)
    assert "51.0" not in text and "standard error over seeds" not in text
    for rule in ("training-domain validation set", "test-domain validation set (oracle)", "[ZB] protocol"):
        assert f"- **{rule}" in text


def test_last_layer_lr_arms_are_two_methods(tmp_path):
    root = tmp_path / "runs"
    for mult, level in ((1.0, 0.3), (10.0, 0.7)):
        for seed in (0, 1):
            fake_run(root, lambda e, sp, s, level=level: level, last_layer_lr_mult=mult, seed=seed)
    s = _study(root)
    tdv = s.tables.ood.cells.query("selection == 'training_domain_validation' and test_env == 'A'")
    assert dict(zip(tdv["method"], tdv["mean"].round(6))) == {
        "tail p=0 last_layer_lr_mult=1": 30.0, "tail p=0 last_layer_lr_mult=10": 70.0}
    assert "last_layer_lr_mult" in s.ident.identity and s.ident.hparams == ()
    chosen = _study(root, hparams=("lr", "weight_decay", "last_layer_lr_mult"))  # selected over, on purpose
    tdv = chosen.tables.ood.cells.query("selection == 'training_domain_validation' and test_env == 'A'")
    assert dict(zip(tdv["method"], tdv["mean"].round(6))) == {"tail p=0": 70.0}


def test_oracle_takes_the_last_checkpoint_and_selects_by_test_out(tmp_path):
    root = tmp_path / "runs"
    # test env A: "in" accuracy peaks at step 2 (0.9) but the last step has 0.4
    fake_run(root, lambda e, sp, s: {0: 0.1, 2: 0.9, 4: 0.4}[s] if (e, sp) == ("A", "in") else
             (0.7 if (e, sp) == ("A", "out") else 0.5), lr=0.01)
    fake_run(root, lambda e, sp, s: 0.3 if (e, sp) != ("A", "out") else 0.2, lr=0.1)
    s = _study(root)
    oracle = _cell(s.tables.ood, "test_domain_oracle", "tail p=0")
    assert oracle["mean"].iloc[0] == pytest.approx(40.0)  # lr=0.01 (test out 0.7 > 0.2), last step


def test_two_test_env_runs_and_missing_cells(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, lambda e, sp, s: 0.5, test_envs=("A",))
    fake_run(root, lambda e, sp, s: 0.6, test_envs=("#0", "C"))  # holds out A and C
    s = _study(root)
    cells = s.tables.ood.cells
    assert set(cells["test_env"]) == {*ENVS, "Avg"}  # no "A,C" column
    tdv = cells.query("selection == 'training_domain_validation'")
    assert tdv.set_index("test_env").loc["Avg", "n"] == 0  # C, P, S missing: Avg is X, not A alone
    assert "leave_one_domain_out" in set(cells["selection"])
    from linft.results.tables import to_markdown
    assert "| tail p=0 | 50.0 ± 0.0 | X | X | X | X |" in to_markdown(s.tables.ood)


def test_iid_table_reports_the_selected_checkpoints(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, lambda e, sp, s: {0: 0.2, 2: 0.9, 4: 0.5}[s] if sp == "out" and e != "A" else 0.1 * s / 2)
    s = _study(root)
    iid = _cell(s.tables.iid, "training_domain_validation", "tail p=0")
    ood = _cell(s.tables.ood, "training_domain_validation", "tail p=0")
    assert iid["mean"].iloc[0] == pytest.approx(90.0) and ood["mean"].iloc[0] == pytest.approx(10.0)


# -- one identity per run --------------------------------------------------------------------
def test_backbone_alias_and_test_env_spellings_give_one_run_id():
    ids = {RunConfig(backbone=b, test_envs=t).run_id
           for b in ("resnet50", "resnet50.in1k_v2") for t in ((), ("A",), ("#0",), ("0",), (0,), ("",))}
    assert len(ids) == 1
    assert RunConfig(backbone="efficientnet_lite0").run_id == RunConfig(backbone="efficientnet_lite0.in1k").run_id
    c = RunConfig.from_dict({"test_envs": "#2,0", "backbone": "tiny_resnet"})
    assert c.test_envs == ("A", "P") and c.to_dict()["test_envs"] == ["A", "P"]
    assert c.to_dict()["backbone"] == "tiny_resnet.random"
    assert RunConfig(dataset="RotatedMNIST", test_envs=("15", "1")).test_envs == ("15",)
    assert RunConfig(dataset="Digits").test_envs == ("mnist",)
    assert RunConfig().replace(dataset="Digits").test_envs == ("mnist",)


def test_unknown_test_env_is_one_clear_error():
    from linft.errors import ConfigError
    with pytest.raises(ConfigError, match=r"unknown test environment '7' for PACS"):
        RunConfig(test_envs=("7",))


def test_static_environment_names_match_the_datasets():
    from linft.data.datasets import FOLDER_DATASETS, MEMORY_DATASETS
    from linft.runs.config import MEMORY_ENVIRONMENTS, environment_names
    assert set(MEMORY_ENVIRONMENTS) == set(MEMORY_DATASETS)
    assert environment_names("VLCS") == FOLDER_DATASETS["VLCS"].environments


def test_domainbed_integer_test_env_on_the_command_line(tmp_path):
    import argparse
    from linft.cli.train import add_config_flags, config_from_args
    from linft.data.synthetic import make_image_tree
    from linft.training.launch import train
    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--test-envs", "0", "--backbone", "tiny_resnet", "--k", "2", "--resolution", "16",
                         "--steps", "2", "--eval-every", "2", "--traj-start", "1", "--lr-decay-steps", "1",
                         "--batch-size", "2", "--mode", "tail", "--quiet", "true",
                         "--data-root", str(make_image_tree(tmp_path / "data", n_per_class=2, size=16).parent)])
    cfg = config_from_args(args)
    assert cfg.run_id == cfg.replace(test_envs=("A",), backbone="tiny_resnet.random").run_id
    rd = train(cfg, tmp_path / "runs")
    recorded = json.loads((rd.path / "config.json").read_text())
    assert recorded["test_envs"] == ["A"] and recorded["backbone"] == "tiny_resnet.random"


# -- DomainBed folders -----------------------------------------------------------------------
def test_collect_and_report_read_a_domainbed_folder(tmp_path):
    r = run_cli("collect", "--domainbed", str(DOMAINBED_SWEEP), "--out", str(tmp_path / "frame.csv"))
    assert r.returncode == 0, r.stderr
    assert "-------- Dataset: VLCS, model selection method: training-domain validation set" in r.stdout
    for fmt, ext in (("csv", "csv"), ("latex", "tex"), ("markdown", "md")):
        r = run_cli("report", "--domainbed", str(DOMAINBED_SWEEP), "--format", fmt, "--out", str(tmp_path / f"r.{ext}"))
        assert r.returncode == 0, r.stderr
    tidy = pd.read_csv(tmp_path / "r.csv")
    assert {"accuracy", "selection", "method", "dataset", "test_env", "mean", "se", "n"} <= set(tidy.columns)
    assert set(tidy["selection"]) >= {"training_domain_validation", "leave_one_domain_out", "test_domain_oracle"}
    assert "\\begin{tabular}" in (tmp_path / "r.tex").read_text()


# -- bad input: one line, exit 2, nothing written -------------------------------------------
def _bad_inputs(tmp: Path) -> dict:
    (tmp / "empty").mkdir(parents=True)
    fake_run(tmp / "unfinished", lambda e, sp, s: 0.5, done=False)
    (tmp / "foreign" / "x").mkdir(parents=True)
    (tmp / "foreign" / "x" / "notes.txt").write_text("hello")
    (tmp / "alien" / "r").mkdir(parents=True)
    (tmp / "alien" / "r" / "config.json").write_text('{"learning_rate": 1}')
    torn = tmp / "torn"
    import shutil
    shutil.copytree(DOMAINBED_SWEEP, torn)
    first = sorted(p for p in torn.iterdir() if (p / "results.jsonl").is_file())[0]
    with open(first / "results.jsonl", "a") as f:
        f.write('{"args": {"dataset": "VLC')
    return {"empty": (["--root", str(tmp / "empty")], "no linft runs"),
            "unfinished": (["--root", str(tmp / "unfinished")], "no finished run"),
            "foreign": (["--root", str(tmp / "foreign")], "no linft runs"),
            "alien": (["--root", str(tmp / "alien")], "is not a linft run config"),
            "missing": (["--root", str(tmp / "nowhere")], "is not a folder"),
            "domainbed_as_root": (["--root", str(torn)], "use --domainbed"),
            "torn": (["--domainbed", str(torn)], "not a complete JSON record")}


@pytest.mark.parametrize("command", ["collect", "report", "plot"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    for name, (src, message) in _bad_inputs(tmp_path / "in").items():
        target = out / ("figs" if command == "plot" else "result.csv")
        r = run_cli(command, *src, "--out", str(target), cwd=out)
        assert r.returncode == 2, (name, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert list(out.iterdir()) == [], (name, list(out.iterdir()))


# -- figures ---------------------------------------------------------------------------------
def test_palette_is_fixed_per_method_and_in_family_order():
    from linft.results.plots import COLORBLIND, method_palette
    a = method_palette(["linear p=0", "full p=0", "tail p=0.9", "tail p=0", "tail p=0 + traj. avg"])
    b = method_palette(["tail p=0 + traj. avg", "tail p=0", "linear p=0", "tail p=0.9", "full p=0"])
    assert a == b
    assert list(a) == ["full p=0", "tail p=0", "tail p=0 + traj. avg", "tail p=0.9", "linear p=0"]
    assert a["tail p=0"][0] == a["tail p=0.9"][0] == COLORBLIND[1] and a["tail p=0"][1] != a["tail p=0.9"][1]
    assert len({a[m][0] for m in ("full p=0", "tail p=0", "tail p=0 + traj. avg", "linear p=0")}) == 4


def test_seed_mean_pools_only_trials():
    from linft.results.selection_frames import seed_mean
    pts = pd.DataFrame({"method": ["m"] * 4, "dataset": ["D"] * 4, "setting": ["lr=1", "lr=1", "lr=2", "lr=2"],
                        "trial": ["s0", "s1", "s0", "s1"], "iid_acc": [0.8, 0.82, 0.2, 0.22],
                        "ood_acc": [0.8, 0.82, 0.2, 0.22]})
    m = seed_mean(pts, ["method", "dataset", "setting"])
    assert list(m["ood_acc"].round(6)) == [81.0, 21.0] and list(m["n"]) == [2, 2]


def test_figures_say_what_their_bars_are(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from linft.results.report import make_figures
    paths = make_figures(two_lr_sweep(tmp_path / "runs"), tmp_path / "figs")
    names = {p.stem for p in paths}
    assert {"iid_vs_ood", "linear_vs_nonlinear"} <= names
    data = pd.read_csv(tmp_path / "figs" / "iid_vs_ood.csv")
    assert len(data) == 2 and set(data["n"]) == {2}  # one point per lr setting, over 2 seeds
    assert sorted(data["ood_acc"].round(6)) == [21.0, 81.0]
