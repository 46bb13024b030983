"""`linft train` (every RunConfig field is a flag; --config FILE with flags overriding it) and
`linft runs ls ROOT`."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from linft.runs.config import RunConfig
from linft.errors import LinftError


def add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", default=None, metavar=str(f.type).upper(),
                       help=f"(default: {shown!r})")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    flags = {f.name: getattr(args, f"cfg_{f.name}") for f in fields(RunConfig)
             if getattr(args, f"cfg_{f.name}", None) is not None}
    return RunConfig.from_dict({**base, **flags})


def _train(args) -> int:
    from linft.training.launch import RunFailed, train
    cfg = config_from_args(args)
    print(Path(args.root) / cfg.run_id, flush=True)
    try:
        rd = train(cfg, args.root)
    except RunFailed as e:
        raise LinftError(f"run failed: {e}") from e
    sel = [r for r in rd.read_rows() if r.get("kind") == "select" and r["model"] == "current"
           and r["metric"] == "acc" and (r["role"], r["split"]) in (("test", "in"),)]
    for r in sel:
        print(f"{r['selection']:>9} step {r['step']:>6}  test {r['env']} acc {r['value']:.4f}")
    return 0


def _runs_ls(args) -> int:
    from linft.runs.store import run_state
    root = Path(args.root)
    if not root.is_dir():
        raise LinftError(f"no runs folder {str(root)!r}")
    print(f"{'run':<22} {'state':<8} {'step':>6}  mode      dataset        p     seed")
    for d in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        cfg = json.loads((d / "config.json").read_text())
        step = 0
        rows = d / "results.jsonl"
        if rows.exists():
            for line in rows.read_text().splitlines():
                try:
                    step = max(step, json.loads(line).get("step", 0))
                except json.JSONDecodeError:
                    pass
        print(f"{d.name:<22} {run_state(d):<8} {step:>6}  {cfg['mode']:<9} {cfg['dataset']:<14} {cfg['p']:<5} {cfg['seed']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train one run (resumes if interrupted; returns at once if done)")
    p.add_argument("--config", help="a JSON or TOML file of RunConfig fields; flags override it")
    p.add_argument("--root", default="runs", help="runs folder (default: ./runs)")
    add_config_flags(p)
    p.set_defaults(func=_train)
    runs = sub.add_parser("runs", help="inspect run folders").add_subparsers(dest="runs_cmd", required=True)
    ls = runs.add_parser("ls", help="list runs and their state")
    ls.add_argument("root")
    ls.set_defaults(func=_runs_ls)
