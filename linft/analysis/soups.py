"""``soups(runs)``: the uniform soup, greedy soup and output ensemble of finished runs, i.e.
``analyze("soup", runs)`` (:mod:`linft.analysis.soup`); kept for callers of the old entry point."""
from __future__ import annotations

from pathlib import Path

from linft.analysis.registry import analyze


def soups(run_paths: list[str | Path], out_root: str | Path | None = None) -> list[dict]:
    """Rows of the soup of ``run_paths`` (stored under the member whose id sorts first;
    ``out_root`` is accepted and unused: soups live under their runs)."""
    return analyze("soup", run_paths)
