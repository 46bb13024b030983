"""The analysis registry (one module = one analysis) and the analysis edges that gave wrong numbers:
linearized pairs with different theta0, soups across different frozen trunks, collected config
columns of multi-run analyses, labels (kernel form, logit averaging, barrier sign)."""
import math
from pathlib import Path

import pandas as pd
import pytest

from linft.analysis import registry
from linft.analysis.registry import analysis_dir, analyze
from linft.analysis.spec import Analysis, Option
from linft.data.synthetic import make_image_tree
from linft.errors import LinftError
from linft.training.launch import train
from conftest import SHORT, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    make_image_tree(root / "data", "PACS", n_per_class=5, size=16)

    def tiny(**kw):
        return train(tiny_config(root / "data", **{**SHORT, **kw}), root / "runs").path
    return dict(tail=tiny(mode="tail"), tail_lr=tiny(mode="tail", lr=0.02), lin=tiny(mode="linear"),
                lin_probe=tiny(mode="linear", head_init="probe", probe_steps=2),
                s1=tiny(mode="tail", seed=1), s1_lr=tiny(mode="tail", seed=1, lr=0.02),
                tail_n=tiny(mode="tail", n_per_domain=10), root=root / "runs")


# -- a toy analysis, declared in this file only ---------------------------------------------------
CALLS = []


def _toy(runs, scale=2.0, verbose=False):
    CALLS.append([r.id for r in runs])
    rows = []
    for r in runs:
        n = sum(t.numel() for t in r.theta.values())
        rows += [dict(env="pooled", role="train", split="out", metric="toy_score", value=scale * n, flavour="plain"),
                 dict(env="pooled", role="train", split="out", metric="toy_other", value=1.0, flavour="plain")]
    return rows, {"note": "toy"}


def _toy_figure(df, out_dir):
    out = Path(out_dir) / "toy.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    df[df["kind"] == "toy"].to_csv(out, index=False)
    return [out]


TOY = Analysis("toy", _toy, help="a toy analysis: scale times the number of trained parameters", runs=(1, 2),
               options=(Option("scale", 2.0, "multiplier"), Option("verbose", False, "talk more", semantic=False)),
               summary=("toy_score",), label=("flavour",), figure=_toy_figure)


@pytest.fixture
def toy():
    registry.register(TOY)
    CALLS.clear()
    yield TOY
    registry.unregister("toy")


def _cli(argv, capsys):
    from linft.cli import app
    rc = app.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_new_analysis_is_one_declaration(runs, toy, capsys, tmp_path):
    from linft.cli.app import _build_parser
    from linft.results import collect
    from linft.results.plots_analysis import make_all
    # listed by `linft analyze --help`, with its own flags and help
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["analyze", "--help"])
    assert "toy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["analyze", "toy", "--help"])
    text = capsys.readouterr().out
    assert "--scale" in text and "multiplier (default: 2.0)" in text and "--verbose" in text and "--dtype" in text
    # run through the CLI; a bad option value is one readable line
    rc, out, _ = _cli(["analyze", "toy", "--run", str(runs["tail"]), "--scale", "3"], capsys)
    assert rc == 0 and "analyses/toy-" in out and "toy_score" in out and len(CALLS) == 1
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["analyze", "toy", "--run", str(runs["tail"]), "--scale", "x"])
    assert "invalid float value" in capsys.readouterr().err
    # cached: a second call reads the folder back; a non-semantic option is the same folder
    rows = analyze("toy", [runs["tail"]], scale=3.0, verbose=True)
    assert len(CALLS) == 1 and {r["analysis"] for r in rows} == {analysis_dir("toy", [runs["tail"]], {"scale": 3})
                                                                  .name}
    assert analysis_dir("toy", [runs["tail"]], {"scale": 4}) != analysis_dir("toy", [runs["tail"]], {"scale": 3})
    with pytest.raises(LinftError, match="unknown option.*scal"):
        analyze("toy", [runs["tail"]], scal=3)
    with pytest.raises(LinftError, match="toy reads 1 to 2 run"):
        analyze("toy", [runs["tail"], runs["tail_lr"], runs["lin"]])
    cfg = (analysis_dir("toy", [runs["tail"]], {"scale": 3}) / "config.json").read_text()
    assert '"verbose": false' in cfg and '"scale": 3.0' in cfg and '"note": "toy"' in cfg
    # collected, summarised, drawn -- with no other edit anywhere
    df = collect.load_rows(runs["root"])
    mine = df[df["kind"] == "toy"]
    assert len(mine) == 2 and (mine["run"] == runs["tail"].name).all() and (mine["mode"] == "tail").all()
    summary = collect.analysis_summary(df)
    row = summary[summary["kind"] == "toy"]
    assert list(row["metric"]) == ["toy_score"] and list(row["variant"]) == ["flavour=plain"]
    assert any("toy" in note for note in collect.analysis_notes())
    assert tmp_path / "figs" / "toy.csv" in make_all(df, tmp_path / "figs")


def test_registering_twice_and_bad_declarations(toy):
    with pytest.raises(LinftError, match="already registered"):
        registry.register(Analysis("toy", _toy, help="another"))
    with pytest.raises(ValueError):
        Analysis("bad kind", _toy, help="x")
    with pytest.raises(LinftError, match="must be one of"):
        Analysis("x", _toy, help="x", options=(Option("o", "c", "h", choices=("a", "b")),))
    assert set(registry.kinds()) >= {"distance", "interp", "funcinterp", "identity", "linearity", "ntk", "trend",
                                     "soup", "toy"}


# -- 3a: two linearized runs with differently initialised heads --------------------------------
def test_linearized_pairs_must_share_theta0_head_included(runs):
    pair = [runs["lin"], runs["lin_probe"]]  # same pre-trained weights; heads: random init vs linear probe
    for kind in ("interp", "funcinterp", "identity"):
        with pytest.raises(LinftError, match="heads were initialised differently.*head_init random vs probe"):
            analyze(kind, pair, grid=3)
    # distances do not evaluate a path: still allowed, and say that only the body is shared
    rows = analyze("distance", pair)
    assert {r["theta0_shared"] for r in rows if "theta0_shared" in r} == {"body"}


# -- 3b: soups need one frozen trunk ---------------------------------------------------------------
def test_soups_refuse_members_with_another_frozen_trunk(runs, capsys):
    first, second = sorted((runs["tail"].name, runs["s1"].name))
    with pytest.raises(LinftError, match=f"{second} does not share {first}'s frozen trunk"):
        analyze("soup", [runs["tail"], runs["s1"]])
    rc, _, err = _cli(["soup", "--root", str(runs["root"]), str(runs["tail"]), str(runs["s1"])], capsys)
    assert rc == 2 and "frozen trunk" in err and len(err.strip().splitlines()) == 1


# -- 2: multi-run children collect with the config of their host, NaN where members differ ---------
def test_soup_rows_are_children_with_the_members_config(runs, capsys):
    from linft.results import collect
    members = [runs["s1_lr"], runs["s1"]]
    rc, out, _ = _cli(["soup", str(members[0]), str(members[1])], capsys)  # --root no longer needed
    assert rc == 0 and "output_ensemble" in out
    host = min(members, key=lambda p: p.name)
    folder = analysis_dir("soup", members)
    assert folder.parent == host / "analyses" and folder == analysis_dir("soup", members[::-1])
    assert not (runs["root"] / "_soups").exists()
    df = collect.load_rows(runs["root"])
    soup = df[df["kind"] == "soup"]
    assert len(soup) and (soup["run"] == host.name).all() and (soup["seed"] == 1).all() and (soup["p"] == 0).all()
    assert soup["lr"].isna().all()  # the members differ in lr: no single value describes the rows
    assert set(soup["member_runs"]) == {",".join(sorted(p.name for p in members))}
    assert {"mean_logits", "mean_weights"} == set(soup["combine"])
    assert set(soup["members"]) == {1, 2} or set(soup["members"]) == {2}
    table = collect.analysis_summary(df)
    assert (table[table["kind"] == "soup"]["variant"].str.startswith("model=")).all()


def test_report_says_how_ensembles_combine(runs, tmp_path):
    from linft.results.report import write_report
    analyze("soup", [runs["s1_lr"], runs["s1"]])
    text = write_report(runs["root"], tmp_path / "report.md").read_text()
    assert "averages the members' logits" in text and "traj. ens = the trajectory ensemble, which averages" in text


def test_trend_is_a_child_of_its_first_run_and_keeps_the_members_fields(runs):
    from linft.results import collect
    pair = [runs["tail"], runs["tail_n"]]
    rows = analyze("trend", pair, kinds=("distance", "ntk"), probe_size=4)
    assert {r["run"] for r in rows} == {runs["tail"].name, runs["tail_n"].name}
    folder = analysis_dir("trend", pair, {"kinds": "distance,ntk", "probe_size": 4})
    assert folder.parent == runs["tail"] / "analyses" and (folder / "done").exists()
    assert not (runs["root"] / "_trends").exists()
    with pytest.raises(LinftError, match="unknown option"):
        analyze("trend", pair, kinds=("distance",), probe_size=4)
    df = collect.load_rows(runs["root"])
    trend = df[df["kind"] == "trend"]
    assert set(trend["run"]) == {runs["tail"].name, runs["tail_n"].name} and (trend["mode"] == "tail").all()
    assert set(trend["n_per_domain"]) == {0, 10} and (trend["lr"] == 0.05).all()
    assert {f for f in trend["form"] if isinstance(f, str)} == {"trace"}


# -- 3c: labels --------------------------------------------------------------------------------------
def test_kernel_form_is_in_every_ntk_row_the_id_and_the_summary(runs):
    from linft.results import collect
    trace = analyze("ntk", [runs["tail"]], probe_size=4)
    full = analyze("ntk", [runs["tail"]], probe_size=4, form="full")
    assert {r["form"] for r in trace} == {"trace"} and {r["form"] for r in full} == {"full"}
    assert trace[0]["analysis"] != full[0]["analysis"]
    table = collect.analysis_summary(collect.load_rows(runs["root"]))
    kd = table[(table["kind"] == "ntk") & (table["metric"] == "kernel_distance")]
    assert {"form=trace", "form=full"} <= set(kd["variant"])
    assert "form" in " ".join(collect.analysis_notes())


def test_barrier_and_ensemble_texts_say_what_is_computed():
    from linft.results import collect
    notes = " ".join(collect.analysis_notes())
    assert "averages the members' logits" in notes and "sums" in notes
    for path in (REPO / "paper_notes.md", REPO / "linft" / "core" / "connectivity.py", REPO / "linft" / "analysis"):
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            text = f.read_text()
            assert "<= 0 means" not in text and "<= 0: no barrier" not in text and "(barrier <= 0)" not in text, f


def test_line_barrier_is_never_negative_with_the_endpoints_on_the_grid(runs):
    rows = analyze("interp", [runs["tail"], runs["tail_lr"]], grid=3, refine=False)
    line = [r["value"] for r in rows if r["metric"].endswith("_barrier") and r["definition"] == "line"]
    assert line and all(v >= 0 and not math.isnan(v) for v in line)
    assert isinstance(pd.DataFrame(rows), pd.DataFrame)
