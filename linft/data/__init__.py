"""Multi-domain datasets, splits, transforms, loaders, the frozen-trunk feature cache, downloads.

Import the submodules directly (``from linft.data.datasets import get_dataset``); this package
imports nothing heavy at import time so that ``linft --help`` stays fast.
"""
