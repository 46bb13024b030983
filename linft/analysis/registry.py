"""The analyses, by kind: the built-in ones (listed once, :data:`BUILTIN`) and any registered by user
code with :func:`register`. :func:`analyze` runs one (or reads it back).

Every analysis is a done-marked child folder of the first run it reads
(:class:`linft.runs.store.ChildDir`)::

    <run>/analyses/<kind>-<sha256[:12]>/{config.json, rows.jsonl, done}

The id hashes the run ids (in order; an analysis of a set of members, e.g. a soup, sorts them) and
the options marked semantic (:meth:`linft.analysis.spec.Analysis.analysis_id`); config.json records
the kind, the member run ids and every option; every row carries ``run`` (the run it lives under,
unless the analysis names another), ``kind`` and ``analysis`` (the folder id), so two analyses with
different options never collect as the same rows. A folder with its ``done`` marker is read back,
never recomputed. Rows follow the tidy row contract (:mod:`linft.runs.rows`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from linft.analysis import distance, funcinterp, identity, interp, linearity, loading, ntk, soup, trajectory, trend
from linft.analysis.spec import Analysis, Option  # noqa: F401  (re-exported: what user analyses declare)
from linft.errors import LinftError
from linft.runs.store import ChildDir

BUILTIN = (distance, interp, funcinterp, identity, linearity, ntk, trajectory, trend, soup)
_REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis, replace: bool = False) -> Analysis:
    """Add ``analysis`` to the registry (``linft analyze``, collect and report pick it up); a kind
    that is already registered is refused unless ``replace``."""
    if not isinstance(analysis, Analysis):
        raise TypeError(f"register takes a linft.analysis.spec.Analysis, got {type(analysis).__name__}")
    if analysis.kind in _REGISTRY and not replace and _REGISTRY[analysis.kind] is not analysis:
        raise LinftError(f"analysis kind {analysis.kind!r} is already registered")
    _REGISTRY[analysis.kind] = analysis
    return analysis


def unregister(kind: str) -> None:
    _REGISTRY.pop(kind, None)


for _module in BUILTIN:
    register(_module.ANALYSIS)


def kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def analyses() -> tuple[Analysis, ...]:
    return tuple(_REGISTRY.values())


def get(kind: str) -> Analysis:
    if kind not in _REGISTRY:
        raise LinftError(f"analysis kind must be one of {kinds()}, got {kind!r}")
    return _REGISTRY[kind]


def _plan(kind: str, runs, options: dict) -> tuple[Analysis, list[Path], dict, ChildDir]:
    analysis = get(kind)
    paths = [Path(r) for r in runs]
    analysis.check_runs(len(paths))
    for p in paths:
        loading.run_config(p)
    if not analysis.ordered:
        paths = sorted(paths, key=lambda p: p.name)
    opts = analysis.resolve(options)
    folder = paths[0] / "analyses" / analysis.analysis_id([p.name for p in paths], opts)
    return analysis, paths, opts, ChildDir(folder)


def analysis_dir(kind: str, runs, options: dict | None = None) -> Path:
    """The folder of analysis ``kind`` of ``runs`` with ``options`` (defaults filled in)."""
    return _plan(kind, runs, dict(options or {}))[3].path


def analyze(kind: str, runs, **options: Any) -> list[dict]:
    """Run (or read back) analysis ``kind`` on finished run folders ``runs``; returns its rows.
    ``options``: the analysis's declared options (``linft analyze KIND --help`` lists them with
    their defaults; unknown ones are an error)."""
    analysis, paths, opts, child = _plan(kind, runs, options)
    if child.done:
        return child.read_rows()
    if analysis.reads == "loaded":
        common = {o.name for o in analysis.all_options} & {"weights", "device", "dtype"}
        load = {k: opts[k] for k in common}
        inputs = [loading.load_run(p, **load) for p in paths]
        rows, info = analysis.compute(inputs, **{k: v for k, v in opts.items() if k not in common})
    else:
        rows, info = analysis.compute(paths, registry=sys.modules[__name__], **opts)
    rows = [{"run": paths[0].name, "kind": kind, "analysis": child.path.name, **r} for r in rows]
    child.write({"kind": kind, "runs": [p.name for p in paths], "options": opts, **info}, rows)
    return rows
