"""linft.results.model_selection against DomainBed's own golden output, and one rule at a time."""
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from linft.errors import LinftError
from linft.results.domainbed_io import read_domainbed_sweep
from linft.results.model_selection import (DOMAINBED_SELECTIONS, FRAME_COLUMNS, SELECTION_METHODS,
                                           collect_results)
from linft.results.tables import format_domainbed_text, to_csv, to_latex, to_markdown

SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"
GOLDEN = SWEEP / "test_sweep_results.txt"
ENVS = {"D": ["a", "b", "c"]}


# ---------------------------------------------------------------- golden: DomainBed's test sweep
@pytest.fixture(scope="module")
def sweep_results():
    return collect_results(read_domainbed_sweep(SWEEP))


def test_reader_frame(sweep_results):
    frame = read_domainbed_sweep(SWEEP)
    assert list(frame.columns[:len(FRAME_COLUMNS)]) == list(FRAME_COLUMNS)
    assert frame.attrs["envs"] == {"VLCS": ("C", "L", "S", "V")} and frame["run"].nunique() == 40
    assert sweep_results.n_records == 200
    assert set(frame["env"]) == {"C", "L", "S", "V"} and frame["done"].all()
    assert len(frame) == 200 * 4 * 2


def test_golden_text_byte_for_byte(sweep_results):
    assert format_domainbed_text(sweep_results, captions=False) == GOLDEN.read_text()


def test_golden_numbers(sweep_results):
    """Every cell of test_sweep_results.txt at DomainBed's precision: 3 selection methods x
    (C, L, S, V, Avg + VLCS, Avg) = 21 cells, 36 numbers counting each +/- interval."""
    golden = GOLDEN.read_text().split("\n-------- ")[1:]
    titles = {m.title: name for name, m in SELECTION_METHODS.items()}
    checked = 0
    for block in golden:
        lines = block.splitlines()
        kind, title = re.match(r"(Dataset: VLCS|Averages), model selection method: (.*)", lines[0]).groups()
        cols, erm = lines[1].split()[1:], re.split(r"\s{2,}", lines[2].strip())[1:]
        sel = titles[title]
        if kind == "Averages":
            ours = sweep_results.averages.query("selection == @sel")
            key = "dataset"
        else:
            ours = sweep_results.cells.query("selection == @sel and dataset == 'VLCS'")
            key = "test_env"
        assert list(ours[key]) == cols
        for col, text in zip(cols, erm):
            r = ours[ours[key] == col].iloc[0]
            mine = f"{r['mean']:.1f}" if col == "Avg" else f"{r['mean']:.1f} +/- {r['se']:.1f}"
            assert mine == text, (sel, kind, col)
            checked += 1 + (col != "Avg")
    assert checked == 36


def test_golden_text_with_captions_only_adds_caption_lines(sweep_results):
    text = format_domainbed_text(sweep_results)
    extra = [l for l in text.splitlines() if l not in GOLDEN.read_text().splitlines()]
    assert len(extra) == 6
    for line in extra:
        assert "n=2 trials" in line and "only trials are averaged" in line and "Model selection: " in line


# ---------------------------------------------------------------- hand-made frames
def frame(*runs, envs=("a", "b", "c")):
    """runs: dicts with test_envs, setting, trial, steps {step: {env: (in, out)}}, [method]."""
    rows = []
    for k, r in enumerate(runs):
        for step, accs in r["steps"].items():
            for env in envs:
                a_in, a_out = accs.get(env, (0.5, 0.5))
                for split, acc in (("in", a_in), ("out", a_out)):
                    rows.append((r.get("method", "ERM"), "D", tuple(r["test_envs"]), r.get("trial", 0),
                                 str(r["setting"]), f"run{k}", step, env, split, acc))
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def cell(res, test_env, sel, row="ERM"):
    c = res.cells.query("selection == @sel and row == @row and test_env == @test_env")
    assert len(c) == 1
    return c.iloc[0]


def run(test_envs, setting, steps, **kw):
    return {"test_envs": test_envs, "setting": setting, "steps": steps, **kw}


def test_training_domain_validation_reports_the_selected_setting_not_the_average():
    f = frame(run(["a"], 0, {0: {"a": (0.9, 0.9), "b": (0.5, 0.8), "c": (0.5, 0.8)}}),
              run(["a"], 1, {0: {"a": (0.3, 0.3), "b": (0.5, 0.2), "c": (0.5, 0.2)}}))
    c = cell(collect_results(f, ["training_domain_validation"], ENVS), "a", "training_domain_validation")
    assert c["mean"] == pytest.approx(90.0) and c["n"] == 1


def test_training_domain_validation_averages_every_env_but_the_test_env():
    # setting 0: train-env out accs 0.6/0.6 (mean .6); setting 1: 0.9/0.2 (mean .55) but a huge
    # test-env out acc, which must not count.
    f = frame(run(["a"], 0, {0: {"a": (0.10, 0.0), "b": (0.5, 0.6), "c": (0.5, 0.6)}}),
              run(["a"], 1, {0: {"a": (0.20, 1.0), "b": (0.5, 0.9), "c": (0.5, 0.2)}}))
    assert cell(collect_results(f, envs=ENVS), "a", "training_domain_validation")["mean"] == pytest.approx(10.0)
    # and the oracle, which looks only at the test env's out acc, takes setting 1
    assert cell(collect_results(f, envs=ENVS), "a", "test_domain_oracle")["mean"] == pytest.approx(20.0)


def test_training_domain_validation_picks_the_best_step_first_on_ties():
    steps = {0: {"a": (0.1, 0), "b": (0, 0.5)}, 1: {"a": (0.2, 0), "b": (0, 0.7)},
             2: {"a": (0.3, 0), "b": (0, 0.7)}, 3: {"a": (0.4, 0), "b": (0, 0.1)}}
    f = frame(run(["a"], 0, steps), envs=("a", "b"))
    assert cell(collect_results(f, envs={"D": ["a", "b"]}), "a", "training_domain_validation")["mean"] == pytest.approx(20.0)


def test_setting_ties_go_to_the_last_setting_in_natural_order():
    same = {"b": (0.5, 0.7), "c": (0.5, 0.7)}
    f = frame(run(["a"], 10, {0: {"a": (0.3, 0), **same}}), run(["a"], 9, {0: {"a": (0.1, 0), **same}}),
              run(["a"], 2, {0: {"a": (0.2, 0), **same}}))
    assert cell(collect_results(f, envs=ENVS), "a", "training_domain_validation")["mean"] == pytest.approx(30.0)


def test_oracle_uses_the_last_checkpoint_not_the_best():
    f = frame(run(["a"], 0, {0: {"a": (0.9, 0.9)}, 5: {"a": (0.4, 0.6)}}),
              run(["a"], 1, {0: {"a": (0.7, 0.5)}, 5: {"a": (0.3, 0.5)}}))
    # setting 0's last step has out 0.6 > 0.5, so setting 0 and its last in acc 0.4
    assert cell(collect_results(f, envs=ENVS), "a", "test_domain_oracle")["mean"] == pytest.approx(40.0)


def test_leave_one_domain_out_uses_the_pair_runs_and_counts_them_for_both_test_envs():
    def sweep(setting, acc_b, acc_c, test_a):
        return [run(["a"], setting, {0: {"a": (test_a, 0)}}),
                run(["a", "b"], setting, {0: {"b": (acc_b, 0)}}),
                run(["a", "c"], setting, {0: {"c": (acc_c, 0)}})]
    f = frame(*sweep(0, 0.9, 0.7, 0.11), *sweep(1, 0.5, 0.5, 0.22))
    res = collect_results(f, ["leave_one_domain_out"], ENVS)
    assert cell(res, "a", "leave_one_domain_out")["mean"] == pytest.approx(11.0)
    # test env b needs runs [b], [b, a] and [b, c]: only [a, b] exists, so b is missing
    assert cell(res, "b", "leave_one_domain_out")["n"] == 0
    # add [b] and [b, c] runs: the [a, b] run now serves test env b too (val env a, in acc .5/.5)
    more = [run(["b"], s, {0: {"b": (t, 0)}}) for s, t in ((0, 0.33), (1, 0.44))]
    more += [run(["b", "c"], 0, {0: {"c": (0.1, 0)}}), run(["b", "c"], 1, {0: {"c": (0.3, 0)}})]
    f2 = frame(*sweep(0, 0.9, 0.7, 0.11), *sweep(1, 0.5, 0.5, 0.22), *more)
    # val for test env b: setting 0: (a-in of [a,b]=0.5 default, c-in .1)/2=.3; setting 1: (.5+.3)/2=.4
    assert cell(collect_results(f2, ["leave_one_domain_out"], ENVS), "b", "leave_one_domain_out")["mean"] == pytest.approx(44.0)


def test_missing_cell_prints_x_and_its_avg_is_x():
    f = frame(run(["a"], 0, {0: {}}), run(["b"], 0, {0: {}}))
    res = collect_results(f, ["training_domain_validation"], ENVS)
    assert cell(res, "c", "training_domain_validation")["n"] == 0
    assert cell(res, "Avg", "training_domain_validation")["n"] == 0
    assert math.isnan(cell(res, "Avg", "training_domain_validation")["mean"])
    line = [l for l in format_domainbed_text(res, captions=False).splitlines() if l.startswith("ERM")][0]
    assert line.split() == ["ERM", "50.0", "+/-", "0.0", "50.0", "+/-", "0.0", "X", "X"]
    # the averages table averages, per trial, the envs that exist: not X
    assert res.averages.query("dataset == 'D'").iloc[0]["mean"] == pytest.approx(50.0)
    assert res.averages.query("dataset == 'Avg'").iloc[0]["mean"] == pytest.approx(50.0)


def test_standard_error_is_np_std_ddof0_over_sqrt_n():
    f = frame(run(["a"], 0, {0: {"a": (0.5, 0)}}, trial=0), run(["a"], 0, {0: {"a": (0.7, 0)}}, trial=1))
    c = cell(collect_results(f, envs=ENVS), "a", "training_domain_validation")
    assert (c["mean"], c["n"]) == (pytest.approx(60.0), 2)
    assert c["se"] == pytest.approx(100 * np.std([0.5, 0.7]) / np.sqrt(2))   # 7.07; ddof=1: 10.0
    assert c["se"] == pytest.approx(10 / math.sqrt(2))


def test_averages_table_is_mean_over_test_envs_per_trial_then_over_trials():
    f = frame(run(["a"], 0, {0: {"a": (0.2, 0)}}, trial=0), run(["b"], 0, {0: {"b": (0.4, 0)}}, trial=0),
              run(["a"], 0, {0: {"a": (0.6, 0)}}, trial=1), run(["b"], 0, {0: {"b": (1.0, 0)}}, trial=1),
              run(["c"], 0, {0: {"c": (0.0, 0)}}, trial=1))
    res = collect_results(f, ["training_domain_validation"], ENVS)
    a = res.averages.query("dataset == 'D'").iloc[0]
    # trial 0: (.2+.4)/2 = .3; trial 1: (.6+1+0)/3 = .5333
    assert a["mean"] == pytest.approx(100 * np.mean([0.3, 1.6 / 3])) and a["n"] == 2
    assert cell(res, "Avg", "training_domain_validation")["mean"] == pytest.approx((40 + 70 + 0) / 3)


def test_zb_no_selection_gives_one_row_per_setting_under_its_own_title():
    f = frame(run(["a"], 0, {0: {"a": (0.8, 0), "b": (0, 0.9)}, 1: {"a": (0.1, 0), "b": (0, 0.1)}}),
              run(["a"], 1, {0: {"a": (0.2, 0), "b": (0, 0.2)}}))
    res = collect_results(f, ["zb_no_selection"], ENVS)
    a = res.cells.query("test_env == 'a'")
    assert list(a["row"]) == ["ERM [0]", "ERM [1]"] and list(a["setting"]) == ["0", "1"]
    assert list(a["mean"]) == pytest.approx([80.0, 20.0])   # step by training-domain validation
    text = format_domainbed_text(res) + to_markdown(res) + to_latex(res)
    for m in DOMAINBED_SELECTIONS:
        assert SELECTION_METHODS[m].title not in text
    assert text.count("[ZB] protocol: no hyperparameter selection, step by training-domain validation") == 8


def test_every_caption_states_method_n_and_trials_only(sweep_results):
    md = [l for l in to_markdown(sweep_results).splitlines() if l.startswith("**")]
    tex = [l for l in to_latex(sweep_results).splitlines() if l.startswith("\\caption")]
    assert len(md) == len(tex) == 6
    for line in md + tex:
        assert "model selection method: " in line and "n=2 trials" in line
        assert "only trials are averaged" in line and "standard error" in line
    assert "98.0 $\\pm$ 0.2" in to_latex(sweep_results) and "98.0 ± 0.2" in to_markdown(sweep_results)


def test_csv_is_tidy(sweep_results, tmp_path):
    text = to_csv(sweep_results, tmp_path / "r.csv")
    back = pd.read_csv(tmp_path / "r.csv")
    assert text == (tmp_path / "r.csv").read_text()
    assert len(back) == 3 * (5 + 2) and set(back["table"]) == {"dataset", "averages"}
    assert list(back.columns) == ["table", "selection", "method", "setting", "row", "dataset", "test_env", "mean", "se", "n"]


# ---------------------------------------------------------------- bad input
def _copy_run(tmp_path, name="0657090f9a83ff76efe083a104fde93a"):
    d = tmp_path / "sweep"
    shutil.copytree(SWEEP / name, d / name)
    return d, d / name / "results.jsonl"


def _listing(d):
    return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, fs in os.walk(d) for f in fs)


def test_empty_folder_is_one_readable_error(tmp_path):
    with pytest.raises(LinftError, match="no results"):
        read_domainbed_sweep(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_folder_without_results_jsonl(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "done").write_text("")
    with pytest.raises(LinftError, match="no results"):
        read_domainbed_sweep(tmp_path)
    with pytest.raises(LinftError, match="not a folder"):
        read_domainbed_sweep(tmp_path / "missing")


def test_torn_line_names_file_and_line(tmp_path):
    d, results = _copy_run(tmp_path)
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:3]) + lines[3][:57])
    before = _listing(d)
    with pytest.raises(LinftError) as err:
        read_domainbed_sweep(d)
    msg = str(err.value)
    assert f"{results}:4:" in msg and "\n" not in msg
    assert _listing(d) == before


def test_bad_frame_is_a_linft_error():
    with pytest.raises(LinftError, match="lacks columns"):
        collect_results(pd.DataFrame({"method": ["x"]}))
    with pytest.raises(LinftError, match="empty"):
        collect_results(pd.DataFrame(columns=list(FRAME_COLUMNS)))
    with pytest.raises(LinftError, match="unknown selection"):
        collect_results(frame(run(["a"], 0, {0: {}})), ["best"])


def test_reader_env_names_mapping(sweep_results):
    names = {"VLCS": ["Caltech101", "LabelMe", "SUN09", "VOC2007"]}
    res = collect_results(read_domainbed_sweep(SWEEP, envs=names))
    assert list(res.cells["test_env"][:5]) == [*names["VLCS"], "Avg"]
    assert list(res.cells["mean"]) == list(sweep_results.cells["mean"])
    with pytest.raises(LinftError, match="names only 2"):
        read_domainbed_sweep(SWEEP, envs={"VLCS": ["C", "L"]})
