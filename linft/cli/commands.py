"""Sub-command registry: each feature area registers its own sub-commands here.

Some areas import torch or pandas to build their parsers (``analyze`` lists the registered
analyses and their options; the results commands list selection methods and formats). When
:func:`linft.cli.app.main` knows which command was invoked it sets ``sub.linft_command``; the other
heavy areas then get a one-line stub (their name and help in ``linft --help``), so that
``linft --help`` and ``linft train ...`` never import them. Without it everything is built."""
from __future__ import annotations

import json


def _inspect(args) -> int:
    from linft.models.inspect import inspect_backbone
    info = inspect_backbone(args.backbone, args.k, args.p, args.num_classes, args.resolution, args.weights_file)
    print(json.dumps(info, indent=2))
    return 0


# command -> its help in `linft --help`, for the areas whose parsers are heavy to build
_HEAVY = {
    "results": {"soup": "uniform soup, greedy soup and output ensemble of finished runs",
                "collect": "all rows of a runs folder as one long table (CSV or Parquet), and the o.o.d. table "
                           "of one selection method",
                "plot": "every figure the runs support (PNG, PDF and the CSV behind each)",
                "report": "a report: summary and DomainBed-style tables (and figures for markdown)",
                "study": "the offline study: convergence of every run, verdicts of its claims (95%% t-intervals over "
                         "seeds), cells, paired differences and figures"},
    "analyze": {"analyze": "analyses of finished runs (distance, interpolation, Taylor fidelity, NTK, "
                           "soups, trends; `linft analyze --help` lists every kind)"},
}


def _wanted(sub, area: str) -> bool:
    only = getattr(sub, "linft_command", None)
    if only is None or only in _HEAVY[area]:
        return True
    for name, help_ in _HEAVY[area].items():
        sub.add_parser(name, help=help_, add_help=False)
    return False


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
    if _wanted(sub, "results"):
        from linft.cli import results
        results.register(sub)
    from linft.cli import bench
    bench.register(sub)
    if _wanted(sub, "analyze"):
        from linft.cli import analyze as analyze_cli
        analyze_cli.register(sub)
    from linft.cli import data as data_commands
    data_commands.register(sub)
