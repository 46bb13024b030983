"""Tables and figures from run folders (or a DomainBed sweep folder): every figure the runs
support, and the report (Markdown, LaTeX or tidy CSV).

Every accuracy table goes through DomainBed's model selection (linft.results.model_selection):
hyperparameters are selected per trial or, under [ZB]'s protocol, each setting is its own row;
only trials (seeds) are averaged (see linft.results.selection_frames for what a method, a setting
and a trial are).  Everything is read and computed before anything is written, so bad input
leaves no half-written output behind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from linft.errors import LinftError
from linft.results import collect, plots
from linft.results import selection_frames as sf
from linft.results import tables as tb
from linft.results.model_selection import SELECTION_METHODS


@dataclass(frozen=True)
class Study:
    """What a report is made of: the selection tables (o.o.d. and i.i.d.) and their inputs."""
    source: str
    tables: sf.Tables
    rows: pd.DataFrame | None        # linft: every row of every run (None for DomainBed input)
    runs: pd.DataFrame | None        # linft: one row per run (config + state)
    ident: sf.Identity | None
    prov: str


def _frame(root) -> pd.DataFrame:
    """Every row under a linft runs root; an error if there are no runs or none finished."""
    sf.finished(sf.run_table(root), root)
    df = collect.load_rows(root)
    if df.empty:
        raise LinftError(f"no run rows under {str(root)!r}")
    return df


def _selections(frame: pd.DataFrame, domainbed: bool) -> list[str]:
    """DomainBed's three selections and [ZB]'s; leave-one-domain-out needs runs holding out two
    domains, so it is left out of a linft sweep that has none."""
    two = bool((frame["test_envs"].map(len) == 2).any())
    return [s for s in sf.SELECTIONS if domainbed or two or s != "leave_one_domain_out"]


def load_study(root=None, domainbed=None, hparams: Sequence[str] = sf.HPARAM_FIELDS,
               models: Sequence[str] = sf.MODELS) -> Study:
    if (root is None) == (domainbed is None):
        raise LinftError("give either a linft runs root or a DomainBed sweep folder")
    if domainbed is not None:
        from linft.results.domainbed_io import read_domainbed_sweep
        frame = read_domainbed_sweep(domainbed)
        prov = plots.provenance(frame) + "; trials: " + ", ".join(sorted(map(str, frame["trial"].unique())))
        return Study(f"DomainBed sweep `{domainbed}`", sf.select(frame, _selections(frame, True)),
                     None, None, None, prov)
    runs = sf.run_table(root)
    done = sf.finished(runs, root)
    rows = collect.load_rows(root)
    ident = sf.identify(done, hparams)
    frame = sf.checkpoint_frame(rows, ident, models)
    return Study(f"linft runs `{root}`", sf.select(frame, _selections(frame, False)), rows, runs, ident,
                 plots.provenance(done))


def _averages(res, what: str) -> pd.DataFrame:
    a = res.averages[res.averages["selection"] == "training_domain_validation"].copy()
    a["accuracy"] = what
    return a


def make_figures(root=None, out_dir="figures", *, domainbed=None, study: Study | None = None) -> list[Path]:
    study = study or load_study(root, domainbed)
    t = study.tables
    palette = plots.method_palette(list(t.frame["method"].unique()))
    paths: list[Path] = []
    points = sf.per_setting_points(t.frame)
    if not points.empty:
        paths += plots.iid_vs_ood(sf.seed_mean(points, ["method", "dataset", "setting"]), out_dir, palette, study.prov)
    avgs = pd.concat([_averages(t.iid, "i.i.d."), _averages(t.ood, "o.o.d.")], ignore_index=True)
    avgs = avgs[avgs["n"] > 0]
    if not avgs.empty:
        paths += plots.accuracy_by_mode(avgs, out_dir, palette, study.prov)
        ood = avgs[(avgs["accuracy"] == "o.o.d.") & (avgs["dataset"] != "Avg")
                   & avgs["method"].str.contains(r" p=[0-9.]+")].copy()
        ood["p"] = ood["method"].str.extract(r" p=([0-9.]+)")[0].astype(float)
        ood["base"] = ood["method"].str.replace(r" p=[0-9.]+", "", regex=True)
        if ood["p"].nunique() > 1:
            paths += plots.ood_vs_dropout(ood, out_dir, palette, study.prov)
    if not points.empty:
        cloud = collect.hparam_clouds(points, settings=("setting",))
        if len(cloud) > cloud["method"].nunique():  # more than one point per method
            paths += plots.clouds(cloud, out_dir, palette, study.prov)
    if study.rows is not None:
        from linft.results import plots_analysis
        paths += plots_analysis.make_all(study.rows, out_dir)
    return paths


def _rules(study: Study) -> list[str]:
    sels = list(dict.fromkeys(study.tables.ood.cells["selection"]))
    lines = ["Selection rules (DomainBed's definitions; only trials are averaged, every interval is the "
             "standard error over the n trials it states, np.std ddof=0 / sqrt(n)):", ""]
    rule = {
        "training_domain_validation": "per trial, the hyperparameter setting and step with the best mean "
                                      "accuracy on the training domains' held-out ('out') splits",
        "leave_one_domain_out": "per trial, the setting and step whose runs holding out one more training "
                                "domain score best on it",
        "test_domain_oracle": "per trial, the setting whose LAST checkpoint scores best on the test domain's "
                              "held-out split (no early stopping on the test domain)",
        "zb_no_selection": "[ZB]'s protocol: no selection across hyperparameter settings, every setting is "
                           "its own row; the step by training-domain validation",
    }
    lines += [f"- **{SELECTION_METHODS[s].title}**: {rule[s]}." for s in sels]
    lines += ["- traj. ens = the trajectory ensemble, which averages the logits of the trajectory's models "
              "([ZB] sums them: the same accuracy, a different loss); traj. avg = the running mean of the "
              "weights after traj_start."]
    if "leave_one_domain_out" not in sels:
        lines += ["- leave-one-domain-out is not shown: no run holds out two domains."]
    if study.ident is not None:
        idf = ", ".join(study.ident.identity) or "none besides mode and p"
        lines += ["", f"Methods: mode, p, the evaluated model and every config field that differs between runs "
                      f"({idf}). Hyperparameters selected over: "
                      f"{', '.join(study.ident.hparams) or 'none vary'} (linft.results.selection_frames.HPARAM_FIELDS). "
                      "A trial is one (trial_seed, seed) pair."]
    return lines + [""]


def _header(study: Study, title: str) -> list[str]:
    lines = [f"# {title}", "", f"Source: {study.source} ({study.prov}).", ""]
    if study.runs is not None:
        states = study.runs["state"].value_counts().to_dict()
        lines += ["Run states: " + ", ".join(f"{k} {v}" for k, v in states.items())
                  + ("" if set(states) == {"done"} else " (only finished runs are tabulated)"), ""]
    return lines


def markdown(study: Study, figs: Sequence[Path], out: Path, title: str) -> str:
    t = study.tables
    lines = _header(study, title)
    lines += ["## Summary: o.o.d. (test domain) and i.i.d. accuracy, %", "",
              "Mean over datasets of each method's averages row (per trial the mean over the test domains it has), "
              "± standard error over n trials; X = missing. Full tables below.", "",
              collect.to_markdown(sf.summary(t)), ""] + _rules(study)
    lines += ["## o.o.d. accuracy (test domain's 'in' split, %)", "", tb.to_markdown(t.ood),
              "## i.i.d. accuracy of the same selected checkpoints (training domains' held-out split, %)", "",
              tb.to_markdown(t.iid)]
    df = study.rows
    if df is not None:
        summary = collect.analysis_summary(df)
        if not summary.empty:
            lines += ["## Linearity measurements (linft analyze; pooled over domains)", "",
                      " ".join(collect.analysis_notes(summary["kind"].unique())), "",
                      collect.to_markdown(summary.astype(object).fillna("")), ""]
        if "mode" in df:
            steps = df[(df["kind"] == "train") & (df["metric"] == "img_per_s")].groupby("mode")["value"].median()
            if not steps.empty:
                lines += ["## Throughput on this machine (median images/s per mode)", ""]
                lines += [f"- {mode}: {v:.0f} img/s" for mode, v in steps.items()] + [""]
    if figs:
        lines += ["## Figures", ""]
    for p in figs:
        if p.suffix == ".png":
            rel = Path(*p.parts[len(out.parent.parts):]) if out.parent in p.parents else p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def _latex_summary(s: pd.DataFrame) -> str:
    cols = list(s.columns)
    esc = tb._tex
    out = ["\\begin{table}[ht]", "\\centering",
           "\\caption{Summary: accuracy (\\%) per method, mean over datasets, $\\pm$ standard error over n "
           "trials (np.std ddof=0 / sqrt(n)); only trials are averaged; X = missing.}",
           "\\begin{tabular}{l" + "c" * (len(cols) - 1) + "}", "\\toprule",
           " & ".join(f"\\textbf{{{esc(c)}}}" for c in cols) + " \\\\", "\\midrule"]
    out += [" & ".join(esc(v).replace("±", "$\\pm$") for v in r) + " \\\\" for r in s.astype(str).itertuples(index=False)]
    return "\n".join(out + ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""])


def latex(study: Study) -> str:
    t = study.tables

    def tag(text, what):
        return re.sub(r"\\caption\{", lambda _: "\\caption{" + what + ". ", text)
    return "\n".join([_latex_summary(sf.summary(t)),
                      tag(tb.to_latex(t.ood), "o.o.d. accuracy (test domain, \\%)"),
                      tag(tb.to_latex(t.iid), "i.i.d. accuracy of the selected checkpoints (\\%)")])


def tidy_csv(study: Study) -> str:
    """Every table as one tidy CSV: accuracy (o.o.d./i.i.d.), table, selection, method, setting,
    row, dataset, test_env, mean, se, n, interval."""
    from io import StringIO
    parts = []
    for what, res in (("o.o.d.", study.tables.ood), ("i.i.d.", study.tables.iid)):
        d = pd.read_csv(StringIO(tb.to_csv(res)), keep_default_na=False, dtype={"test_env": str, "setting": str})
        d.insert(0, "accuracy", what)
        parts.append(d)
    out = pd.concat(parts, ignore_index=True)
    out["interval"] = "standard error over n trials (np.std ddof=0 / sqrt(n))"
    return out.to_csv(index=False)


FORMATS = {"markdown": ".md", "latex": ".tex", "csv": ".csv"}


def write_report(root=None, out: str | Path | None = None, figures_dir: str | Path | None = None,
                 title: str = "linft report", *, domainbed=None, fmt: str = "markdown",
                 hparams: Sequence[str] = sf.HPARAM_FIELDS) -> Path:
    if fmt not in FORMATS:
        raise LinftError(f"unknown report format {fmt!r}; choose one of {list(FORMATS)}")
    study = load_study(root, domainbed, hparams)   # reads and checks everything before writing
    out = Path(out) if out else Path("report" + FORMATS[fmt])
    if fmt == "latex":
        text = latex(study)
    elif fmt == "csv":
        text = tidy_csv(study)
    else:
        figures_dir = Path(figures_dir) if figures_dir else out.parent / "figures"
        text = markdown(study, [], out, title)  # every table first: an error here writes nothing
        text = markdown(study, make_figures(out_dir=figures_dir, study=study), out, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
