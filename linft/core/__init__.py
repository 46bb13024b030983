"""linft.core: pure torch. Surgery, heads, the Taylor linearization, the unfolded model (Eq. 1).

Imports torch and the standard library only (a test enforces it), plus linft.errors.
"""
from linft.core.heads import DropoutHead, check_dropout_rate, pool
from linft.core.linearize import LinearizedModule, linearize
from linft.core.surgery import Layout, Split, count_parameters, freeze_batchnorm, layout_of, split_network
from linft.core.unfold import UnfoldedModel, block_features

__all__ = ["DropoutHead", "check_dropout_rate", "pool", "LinearizedModule", "linearize", "Layout", "Split", "count_parameters",
           "freeze_batchnorm", "layout_of", "split_network", "UnfoldedModel", "block_features"]
