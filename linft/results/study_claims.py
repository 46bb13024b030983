"""The offline study's verdicts and its output folder (definitions: :mod:`linft.results.study`).

Each claim is judged from converged runs only, fixed-steps protocol, model current unless said;
a difference is paired by seed (same n, same protocol); an interval is the 95% t-interval over seeds.

- (a) p=0.9 improves ood over p=0 at small n (tail): d(n) = ood(p=.9) - ood(p=0), n in {100, 300,
  1000}. *Size rule*: reproduced when the CI lies above 0 at >= 2 sizes and below 0 at none;
  contradicted when below 0 at >= 2 and above 0 at none; else inconclusive.
- (b) p=0.9 beats trajectory averaging and ensembling (tail): d_avg = ood(p=.9, current) -
  ood(p=0, traj_avg), d_ens likewise with traj_ens, small sizes, each by the size rule;
  reproduced iff both are, contradicted iff either is.
- (c) the best p falls as n grows (tail): per-seed slope of ood(p=.9) - ood(p=0) against log10 n
  over all sizes; CI < 0 reproduced, > 0 contradicted. Also: the best p per n (argmax over the p
  present of the seed-mean ood).
- (d) the linearized tail matches the standard tail at small n and the gap grows: g(n) = ood(tail)
  - ood(linear), same p; p=0.9 decides, p=0 is reported. Matches: the CI at n=100 lies within
  [-2, 2] points; grows: slope CI > 0. Reproduced iff both; contradicted iff the n=100 CI lies
  entirely outside [-2, 2] or the slope CI < 0.
- (e) fidelity falls and the kernel moves more as n grows (tail, p=0.9 and p=0): per-seed slopes
  against log10 n of rel_err_l2 (linearity posthoc, t=1, pooled) and of kernel_distance (ntk, full
  form). Reproduced iff every slope CI > 0; contradicted iff any is < 0.
- (f) the random trunk is nonlinear: per n, rel_err_l2(random trunk, p=0) - rel_err_l2(tail, p=0);
  reproduced iff the CI lies above 0 at every size present (a size with one paired seed has no
  CI: inconclusive); contradicted iff below 0 at any.

Missing data (an arm or size absent, < 2 seeds) makes a verdict "inconclusive (missing: ...)".
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from linft.errors import LinftError
from linft.results import study as st

SMALL_N = (100, 300, 1000)
MARGIN = 2.0  # points: the equivalence margin of claim (d)


class _Ctx:
    """The values table, plus what the claims used: excluded runs, paired rows, notes."""

    def __init__(self, vals: pd.DataFrame):
        self.vals, self.excluded, self.paired, self.notes = vals, set(), [], []

    def select(self, arm, p, quantity="ood", model="current", protocol=st.FIXED_STEPS) -> pd.DataFrame:
        v = self.vals
        g = v[(v["arm"] == arm) & (v["p"].astype(float) == p) & (v["quantity"] == quantity)
              & (v["model"] == model) & (v["protocol"] == protocol)]
        self.excluded |= set(g.loc[~g["converged"], "run"])
        g = g[g["converged"]]
        several = g.groupby("n")["setting"].nunique()
        for n in several[several > 1].index:
            names = ", ".join(sorted(g.loc[g["n"] == n, "setting"].unique()))
            self.notes.append(f"{arm} p={p:g} n={n}: several settings ({names}), left out")
        g = g[~g["n"].isin(several[several > 1].index)]
        return g[["n", "seed", "run", "value"]]

    def pair(self, claim, label, a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
        m = a.merge(b, on=["n", "seed"], suffixes=("_a", "_b"))
        m["diff"] = m["value_a"] - m["value_b"]
        m.insert(0, "comparison", label)
        m.insert(0, "claim", claim)
        self.paired.append(m)
        return m


def _fmt(iv: dict, digits: int = 2) -> str:
    if iv["n_seeds"] == 0:
        return "-"
    if iv["n_seeds"] < 2:
        return f"{iv['mean']:+.{digits}f} (S=1)"
    return f"{iv['mean']:+.{digits}f} [{iv['lo']:+.{digits}f}, {iv['hi']:+.{digits}f}] (S={iv['n_seeds']})"


def by_size(pairs: pd.DataFrame) -> dict:
    return {int(n): st.interval(g["diff"]) for n, g in pairs.groupby("n")}


def size_rule(per_size: dict, sizes, what: str) -> tuple[str, list[str]]:
    """(a)'s rule over ``sizes``: the verdict and the missing sizes (< 2 paired seeds)."""
    ok = {n: per_size[n] for n in sizes if n in per_size and per_size[n]["n_seeds"] >= 2}
    gaps = [str(n) for n in sizes if n not in ok]
    missing = [f"{what} at n={', '.join(gaps)} (< 2 converged paired seeds)"] if gaps else []
    pos = sum(iv["lo"] > 0 for iv in ok.values())
    neg = sum(iv["hi"] < 0 for iv in ok.values())
    if pos >= 2 and neg == 0:
        return "reproduced", missing
    if neg >= 2 and pos == 0:
        return "contradicted", missing
    return "inconclusive", missing


def slopes(pairs: pd.DataFrame, col: str = "diff") -> pd.DataFrame:
    """Per seed: the slope of ``col`` against log10 n over that seed's sizes (>= 2)."""
    out = [{"seed": s, "slope": st.slope(g["n"], g[col]), "sizes": ",".join(map(str, sorted(g["n"])))}
           for s, g in pairs.groupby("seed")]
    return pd.DataFrame(out, columns=["seed", "slope", "sizes"]).dropna(subset=["slope"])


def _sign(iv: dict) -> int:
    """+1 / -1 when the CI lies above / below 0, 0 otherwise or without an interval."""
    if not iv["n_seeds"] >= 2 or not math.isfinite(iv["half"]):
        return 0
    return 1 if iv["lo"] > 0 else -1 if iv["hi"] < 0 else 0


def _with_missing(verdict: str, missing: list[str]) -> str:
    return verdict + (f" (missing: {'; '.join(missing)})" if verdict == "inconclusive" and missing else "")


def _sizes_text(per_size: dict, digits: int = 2) -> str:
    return "; ".join(f"n={n}: {_fmt(iv, digits)}" for n, iv in sorted(per_size.items())) or "no paired seeds"


def _slope_iv(ctx, claim, label, pairs) -> tuple[dict, str]:
    sl = slopes(pairs)
    ctx.paired.append(sl.assign(claim=claim, comparison=f"slope vs log10 n of {label}"))
    iv = st.interval(sl["slope"])
    uneven = sl["sizes"].nunique() > 1
    return iv, f"slope per decade {_fmt(iv, 3)}" + (" (seeds cover different sizes)" if uneven else "")


def claim_a(ctx) -> dict:
    d = ctx.pair("a", "ood(tail p=0.9) - ood(tail p=0)", ctx.select("tail", 0.9), ctx.select("tail", 0.0))
    per = by_size(d)
    verdict, missing = size_rule(per, SMALL_N, "tail p=0.9 vs p=0")
    return {"claim": "(a) p=0.9 improves ood over p=0 at small n (tail)", "verdict": _with_missing(verdict, missing),
            "numbers": _sizes_text({n: per[n] for n in per if n in SMALL_N})}


def claim_b(ctx) -> dict:
    parts, texts, missing = [], [], []
    for model, short in (("traj_avg", "avg"), ("traj_ens", "ens")):
        d = ctx.pair("b", f"ood(tail p=0.9) - ood(tail p=0 {model})", ctx.select("tail", 0.9),
                     ctx.select("tail", 0.0, model=model))
        per = by_size(d)
        v, m = size_rule(per, SMALL_N, f"d_{short}")
        parts.append(v)
        missing += m
        texts.append(f"d_{short} [{v}]: " + _sizes_text({n: per[n] for n in per if n in SMALL_N}))
    verdict = "reproduced" if all(v == "reproduced" for v in parts) else \
        "contradicted" if "contradicted" in parts else "inconclusive"
    return {"claim": "(b) p=0.9 beats trajectory averaging and ensembling (tail, small n)",
            "verdict": _with_missing(verdict, missing), "numbers": " | ".join(texts)}


def claim_c(ctx) -> dict:
    d = ctx.pair("c", "ood(tail p=0.9) - ood(tail p=0)", ctx.select("tail", 0.9), ctx.select("tail", 0.0))
    iv, text = _slope_iv(ctx, "c", "ood(p=0.9) - ood(p=0)", d)
    s = _sign(iv)
    verdict = "reproduced" if s < 0 else "contradicted" if s > 0 else \
        _with_missing("inconclusive", [] if iv["n_seeds"] >= 2 else ["< 2 seeds with >= 2 sizes"])
    return {"claim": "(c) the best p falls as n grows (tail)", "verdict": verdict, "numbers": text}


def best_p(vals: pd.DataFrame, arm: str = "tail", protocol: str = st.FIXED_STEPS) -> pd.DataFrame:
    """Per n: the p of the highest seed-mean ood (converged runs, model current) and that mean."""
    v = vals[(vals["arm"] == arm) & (vals["protocol"] == protocol) & (vals["quantity"] == "ood")
             & (vals["model"] == "current") & vals["converged"]]
    if v.empty:
        return pd.DataFrame(columns=["n", "best_p", "ood_mean", "p_present"])
    m = v.groupby(["n", "p"])["value"].mean().reset_index()
    rows = [{"n": int(n), "best_p": float(g.loc[g["value"].idxmax(), "p"]), "ood_mean": round(float(g["value"].max()), 2),
             "p_present": ",".join(f"{p:g}" for p in sorted(g["p"]))} for n, g in m.groupby("n")]
    return pd.DataFrame(rows)


def claim_d(ctx, p: float) -> dict:
    g = ctx.pair("d", f"ood(tail p={p:g}) - ood(linear p={p:g})", ctx.select("tail", p), ctx.select("linear", p))
    per = by_size(g)
    iv0 = per.get(100, st.interval([]))
    match = 0
    if iv0["n_seeds"] >= 2:
        inside = iv0["lo"] >= -MARGIN and iv0["hi"] <= MARGIN
        outside = iv0["hi"] < -MARGIN or iv0["lo"] > MARGIN
        match = 1 if inside else -1 if outside else 0
    siv, stext = _slope_iv(ctx, "d", f"g(n) p={p:g}", g)
    grow = _sign(siv)
    missing = ([] if iv0["n_seeds"] >= 2 else ["n=100 (< 2 paired seeds)"]) + \
              ([] if siv["n_seeds"] >= 2 else ["slope (< 2 seeds with >= 2 sizes)"])
    verdict = "reproduced" if match == 1 and grow == 1 else "contradicted" if match == -1 or grow == -1 else \
        _with_missing("inconclusive", missing)
    return {"claim": f"(d) linear tail matches the tail at n=100 (within +-{MARGIN:g}) and the gap grows, p={p:g}"
                     + ("" if p == 0.9 else " (reported)"),
            "verdict": verdict, "numbers": f"g: {_sizes_text(per)}; {stext}"}


def claim_e(ctx) -> dict:
    signs, texts, missing = [], [], []
    for p in (0.9, 0.0):
        for q in ("rel_err_l2", "kernel_distance"):
            a = ctx.select("tail", p, quantity=q).rename(columns={"value": "diff"})
            ctx.paired.append(a.assign(claim="e", comparison=f"{q} (tail p={p:g})"))
            iv, text = _slope_iv(ctx, "e", f"{q} (tail p={p:g})", a)
            signs.append(_sign(iv))
            texts.append(f"{q} p={p:g}: {text}")
            if iv["n_seeds"] < 2:
                missing.append(f"{q} tail p={p:g}")
    verdict = "reproduced" if all(s == 1 for s in signs) else "contradicted" if -1 in signs else \
        _with_missing("inconclusive", missing)
    return {"claim": "(e) fidelity falls (rel_err_l2 grows) and the kernel distance grows with n (tail)",
            "verdict": verdict, "numbers": "; ".join(texts)}


def claim_f(ctx) -> dict:
    d = ctx.pair("f", "rel_err_l2(random trunk p=0) - rel_err_l2(tail p=0)",
                 ctx.select("random trunk", 0.0, quantity="rel_err_l2"), ctx.select("tail", 0.0, quantity="rel_err_l2"))
    per = by_size(d)
    signs = [_sign(iv) for iv in per.values()]
    v = ctx.vals
    trained = v[(v["arm"] == "random trunk") & (v["p"].astype(float) == 0.0) & (v["protocol"] == st.FIXED_STEPS)]
    # "every size": every size the control was trained at, not only those where enough runs converged
    thin = [str(n) for n in sorted(set(trained["n"]) | set(per)) if n not in per or per[n]["n_seeds"] < 2]
    if not any(iv["n_seeds"] >= 2 for iv in per.values()):
        verdict = "inconclusive (missing: random trunk or pretrained tail rel_err_l2 with >= 2 paired seeds)"
    elif -1 in signs:
        verdict = "contradicted"
    elif all(s == 1 for s in signs) and not thin:
        verdict = "reproduced"
    else:
        verdict = _with_missing("inconclusive", [f"n={', '.join(thin)} (< 2 paired converged seeds)"] if thin else [])
    return {"claim": "(f) the random trunk is nonlinear (rel_err_l2 above the pretrained tail's, p=0)",
            "verdict": verdict, "numbers": _sizes_text(per, 3)}


def _seeds(paired: list[pd.DataFrame]) -> str:
    """The numbers of seeds behind a claim's intervals (per size and comparison; slopes: seeds fitted)."""
    counts = [int(c) for p in paired if len(p) for c in
              (p.groupby(["comparison", "n"]).size() if "n" in p else [len(p)])]
    if not counts:
        return "0"
    return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def claims(vals: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The claims table (claim, verdict, numbers, seeds, excluded runs), every paired difference used,
    and notes (cells left out for holding several settings)."""
    rows, paired, notes = [], [], set()
    for fn in (claim_a, claim_b, claim_c, lambda c: claim_d(c, 0.9), lambda c: claim_d(c, 0.0), claim_e, claim_f):
        ctx = _Ctx(vals)
        rows.append({**fn(ctx), "seeds": _seeds(ctx.paired), "excluded_runs": len(ctx.excluded)})
        paired += [p for p in ctx.paired if len(p)]
        notes |= set(ctx.notes)
    return pd.DataFrame(rows), pd.concat(paired, ignore_index=True) if paired else pd.DataFrame(), sorted(notes)


def analyse(root, fixed_steps: int, epochs: float, n_all: int | None = None, chance: float = 10.0,
            fidelity_role: str = "train"):
    """Everything write_study writes, computed (nothing written): a dict of DataFrames.
    ``fidelity_role``: the pooled Taylor-fidelity row claims (e), (f) read (train: the training
    domains' held-out split, the split the NTK probe is drawn from; test: the test domains)."""
    from linft.results.collect import load_rows, run_folders
    if not run_folders(root):
        raise LinftError(f"no run folders under {str(root)!r} (a run is a folder holding config.json)")
    df = load_rows(root)
    if df.empty or "kind" not in df:
        raise LinftError(f"no run rows under {str(root)!r}")
    runs = st.runs_table(df, fixed_steps, epochs, n_all)
    conv = st.convergence(df, runs, chance=chance)
    vals = st.values(df, runs, conv, fidelity_role)
    table, paired, notes = claims(vals)
    return {"rows": df, "runs": runs, "convergence": conv, "values": vals, "cells": st.cells(vals),
            "claims": table, "paired": paired, "notes": notes, "best_p": best_p(vals)}


def write_study(root, out_dir, fixed_steps: int, epochs: float, curves_n: int = 1000, n_all: int | None = None,
                chance: float = 10.0, fidelity_role: str = "train") -> list[Path]:
    """claims.md, cells.csv, paired.csv, convergence.csv and the figures under ``out_dir``
    (arguments: :func:`analyse`; ``curves_n``: the size of the training-curve figures, with the
    largest size)."""
    from linft.results import study_plots
    from linft.results.collect import to_markdown
    res = analyse(root, fixed_steps, epochs, n_all, chance, fidelity_role)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conv = res["convergence"]
    n_bad = int((~conv["converged"]).sum()) if len(conv) else 0
    text = [f"# Offline study: claims\n\nfixed-steps = {fixed_steps} steps, fixed-epochs = {epochs:g} epochs; "
            f"Taylor fidelity: pooled {'i.i.d. held-out' if fidelity_role == 'train' else 'o.o.d.'} rows; "
            f"{len(conv)} runs, {n_bad} not converged (excluded; convergence.csv says why). Numbers: per size, "
            "mean [95% t-interval over seeds] (S = seeds) of the paired difference, in accuracy points "
            "(rel_err_l2, kernel distance: fractions).\n", to_markdown(res["claims"]),
            "\n\n## Best p per n (tail, fixed-steps, seed-mean ood)\n", to_markdown(res["best_p"]), "\n"]
    if res["notes"]:
        text += ["\n## Notes\n"] + [f"- {n}\n" for n in res["notes"]]
    paths = [out / "claims.md", out / "cells.csv", out / "paired.csv", out / "convergence.csv"]
    paths[0].write_text("".join(text))
    for frame, path in zip((res["cells"], res["paired"], conv), paths[1:]):
        frame.round(6).to_csv(path, index=False)
    return paths + study_plots.figures(res, out / "figures", curves_n, fixed_steps, epochs)
