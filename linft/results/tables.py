"""Tables of a SelectionResults: DomainBed's collect_results text, Markdown, LaTeX, tidy CSV.

Numbers are percentages with one decimal, as DomainBed prints them; "X" marks a cell without
trials and an Avg over a missing cell.
"""
from __future__ import annotations

import math
import os

import pandas as pd

from linft.results.model_selection import SELECTION_METHODS, SelectionResults


def _n_text(ns) -> str:
    ns = sorted({int(n) for n in ns if n > 0})
    if not ns:
        return "n=0"
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]} (per cell)"


def caption(selection: str, ns, averages: bool = False, pm: str = "+/-", method: bool = True) -> str:
    """One line: the selection method (unless ``method=False``, when the title beside it says
    it), the interval = standard error over n trials, and that only trials are averaged."""
    m = SELECTION_METHODS[selection]
    how = ("no hyperparameter selection: each setting is its own row, its step chosen within each "
           "run by training-domain validation" if m.per_setting
           else "hyperparameters and step selected within each trial")
    per = "Per trial the mean over test envs, then mean" if averages else "Mean"
    head = f"Model selection: {m.title}. " if method else ""
    return (f"{head}{per} {pm} standard error over {_n_text(ns)} trials (np.std ddof=0 / sqrt(n)); "
            f"only trials are averaged ({how}); Avg = mean of the cell means; X = missing.")


def _cell(mean: float, se: float, n: int, pm: str) -> str:
    if n == 0 or math.isnan(mean):
        return "X"
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} {pm} {se:.1f}"


def _tables(results: SelectionResults, pm: str):
    """Yield (selection, title_text, col_labels, [(row label, [cells])], ns, is_averages)."""
    cells, avgs = results.cells, results.averages
    for sel in dict.fromkeys(cells["selection"]):
        title = SELECTION_METHODS[sel].title
        c = cells[cells["selection"] == sel]
        for dataset in dict.fromkeys(c["dataset"]):
            d = c[c["dataset"] == dataset]
            rows = [(label, [_cell(r.mean, r.se, r.n, pm) for r in g.itertuples()])
                    for label, g in d.groupby("row", sort=False)]
            ns = d.loc[d["test_env"] != "Avg", "n"]
            yield (sel, f"Dataset: {dataset}, model selection method: {title}",
                   ["Algorithm", *results.envs[dataset], "Avg"], rows, ns, False)
        a = avgs[avgs["selection"] == sel]
        rows = [(label, [_cell(r.mean, r.se, r.n, pm) for r in g.itertuples()])
                for label, g in a.groupby("row", sort=False)]
        yield (sel, f"Averages, model selection method: {title}",
               ["Algorithm", *dict.fromkeys(a["dataset"])], rows, a.loc[a["dataset"] != "Avg", "n"], True)


def format_domainbed_text(results: SelectionResults, *, captions: bool = True,
                          header: bool = True) -> str:
    """collect_results' text output (results.txt).  With ``captions=False`` it is DomainBed's,
    byte for byte (trailing spaces included); ``captions=True`` adds one line under each
    "-------- ..." title stating the selection method, n and that only trials are averaged.
    Selection methods not in DomainBed (zb_no_selection) widen the label column to fit."""
    out = [f"Total records: {results.n_records}\n"] if header else []
    for sel, title, cols, rows, ns, averages in _tables(results, "+/-"):
        width = 25 if averages else 20
        label_width = width
        if not SELECTION_METHODS[sel].domainbed:
            label_width = max([width] + [len(label) + 2 for label, _ in rows])
        out.append(f"\n-------- {title}\n")
        if captions:
            out.append(caption(sel, ns, averages) + "\n")
        for label, vals in [(cols[0], cols[1:])] + rows:
            line = "  ".join([str(label).ljust(label_width)[:label_width]] +
                             [str(v).ljust(width)[:width] for v in vals])
            out.append(line + " \n")
    return "".join(out)


def to_markdown(results: SelectionResults) -> str:
    """One GitHub Markdown table per (selection, dataset) and per selection's averages table."""
    out = []
    for sel, title, cols, rows, ns, averages in _tables(results, "±"):
        out.append(f"**{title}.** {caption(sel, ns, averages, '±', method=False)}\n\n")
        out.append("| " + " | ".join(cols) + " |\n")
        out.append("|" + "|".join([":---"] + [":---:"] * (len(cols) - 1)) + "|\n")
        for label, vals in rows:
            out.append("| " + " | ".join([label.replace("|", "\\|"), *vals]) + " |\n")
        out.append("\n")
    return "".join(out)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(results: SelectionResults) -> str:
    """booktabs tables (one table float each), cells "mean $\\pm$ se", caption as in caption()."""
    out = []
    for sel, title, cols, rows, ns, averages in _tables(results, "$\\pm$"):
        cap = _tex(title + ". " + caption(sel, ns, averages, method=False)).replace("+/-", r"$\pm$")
        out += ["\\begin{table}[ht]", "\\centering", f"\\caption{{{cap}}}",
                "\\begin{tabular}{l" + "c" * (len(cols) - 1) + "}", "\\toprule",
                " & ".join(f"\\textbf{{{_tex(c)}}}" for c in cols) + " \\\\", "\\midrule"]
        out += [" & ".join([_tex(label), *vals]) + " \\\\" for label, vals in rows]
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def to_csv(results: SelectionResults, path: str | os.PathLike | None = None) -> str:
    """Tidy CSV: table ("dataset"/"averages"), selection, method, setting, row, dataset,
    test_env (empty in the averages table), mean, se (percent, full precision), n.  Written to
    ``path`` if given; returned either way."""
    cells = results.cells.assign(table="dataset")
    avgs = results.averages.assign(table="averages", test_env="")
    tidy = pd.concat([cells, avgs], ignore_index=True)[["table", *results.cells.columns]]
    text = tidy.to_csv(index=False)
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text
