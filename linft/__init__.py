"""linft: fine-tuning with very large dropout, the exact Taylor linearization of a network's tail,
and direct measurements of how linear fine-tuning is ([ZB] Zhang & Bottou 2024).

The curated API (imported on first use, so ``import linft`` stays light for the command line):

- models and surgery: :func:`build_backbone`, :func:`split_network`, :func:`freeze_batchnorm`
- the linear models: :func:`linearize` (first-order Taylor model of tail + head), :class:`UnfoldedModel` (Eq. 1)
- runs: :class:`RunConfig`, :func:`train`, :func:`load_run`
- analyses: :func:`analyze`
- results: :func:`load_rows` (every row of a runs folder as one tidy DataFrame)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "build_backbone": "linft.models.backbones",
    "split_network": "linft.core",
    "freeze_batchnorm": "linft.core",
    "linearize": "linft.core",
    "UnfoldedModel": "linft.core",
    "RunConfig": "linft.runs.config",
    "train": "linft.training.launch",
    "load_run": "linft.analysis.loading",
    "analyze": "linft.analysis.registry",
    "load_rows": "linft.results.collect",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'linft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
