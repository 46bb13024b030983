"""linft: fine-tuning with very large dropout, the exact Taylor linearization of a network's tail,
and direct measurements of how linear fine-tuning is (Zhang & Bottou 2024)."""
from linft.core import linearize

__version__ = "0.1.0"
__all__ = ["linearize", "__version__"]
