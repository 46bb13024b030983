"""linft: fine-tuning with very large dropout, the exact Taylor linearization of a network's tail,
and direct measurements of how linear fine-tuning is (Zhang & Bottou 2024)."""

__version__ = "0.1.0"
__all__ = ["linearize", "__version__"]


def __getattr__(name: str):
    # lazy: ``import linft`` (and so ``linft --help``) must not import torch
    if name == "linearize":
        from linft.core import linearize
        return linearize
    raise AttributeError(f"module 'linft' has no attribute {name!r}")
