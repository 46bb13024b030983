"""What every benchmark script shares: linft importable from the checkout, the device, a sync."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU = DEV == "cpu"


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock timers measure it (a no-op on CPU)."""
    if not CPU:
        torch.cuda.synchronize()
