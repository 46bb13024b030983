"""Sub-command registry: each feature area registers its own sub-commands here."""
from __future__ import annotations

import json


def _inspect(args) -> int:
    from linft.models.inspect import inspect_backbone
    info = inspect_backbone(args.backbone, args.k, args.p, args.num_classes, args.resolution, args.weights_file)
    print(json.dumps(info, indent=2))
    return 0


def register_all(sub) -> None:
    from linft.cli import demo
    p = sub.add_parser("inspect", help="split a backbone, linearize its tail and check f_lin(theta0) == f(theta0)")
    p.add_argument("backbone", help="registry name, e.g. efficientnet_lite0, resnet50.in1k_v2, resnet50.random")
    p.add_argument("--k", type=int, default=3, help="number of last residual blocks in the tail (default 3)")
    p.add_argument("--p", type=float, default=0.9, help="dropout rate on the pooled representation, in [0, 1)")
    p.add_argument("--num-classes", type=int, default=7)
    p.add_argument("--resolution", type=int, default=64, help="input side in pixels for the check")
    p.add_argument("--weights-file", default=None, help="a local checkpoint to load instead of the registry's")
    p.set_defaults(func=_inspect)
    demo.register(sub)
    from linft.cli import train as train_cli
    train_cli.register(sub)
    from linft.cli import sweep as sweep_cli
    sweep_cli.register(sub)
    from linft.cli import results
    results.register(sub)
    from linft.cli import bench
    bench.register(sub)
    from linft.cli import analyze as analyze_cli
    analyze_cli.register(sub)
    from linft.cli import data as data_commands
    data_commands.register(sub)
