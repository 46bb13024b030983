"""`linft demo`: the smallest real end-to-end job on the embedded default (offline)."""
from __future__ import annotations

import json


def run_demo(args) -> int:
    from linft.inspect_model import inspect_backbone
    info = inspect_backbone("efficientnet_lite0", 3, 0.9, 10, 64)
    print(json.dumps(info, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the offline demo on the embedded default (EfficientNet-Lite0)")
    p.set_defaults(func=run_demo)
