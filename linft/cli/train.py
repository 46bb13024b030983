"""`linft train` (every RunConfig field is a flag, documented from the field itself; --config FILE
with flags overriding it), `linft runs ls ROOT` and `linft runs gc ROOT`.

Building these parsers imports neither torch nor pandas (``linft --help`` stays fast); a field's
choices that live in torch-importing modules (the modes) are resolved only when shown or checked.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from linft.cli.helpfmt import LazyHelpFormatter
from linft.errors import LinftError
from linft.runs.config import FieldDoc, RunConfig, field_docs

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class _LazyChoices:
    """Choices computed on first use (membership test or help), e.g. the mode names."""

    def __init__(self, source):
        self._source, self._items = source, None

    def _get(self) -> tuple:
        if self._items is None:
            self._items = tuple(self._source() if callable(self._source) else self._source)
        return self._items

    def __contains__(self, x) -> bool:
        return x in self._get()

    def __iter__(self):
        return iter(self._get())


class _BoolFlag(argparse.Action):
    """``--flag`` / ``--no-flag`` (argparse.BooleanOptionalAction's spelling), and still
    ``--flag true|false|1|0|yes|no`` as before."""

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        opts = [s for o in option_strings for s in (o, "--no-" + o[2:])]
        super().__init__(opts, dest, nargs="?", default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value (got {values!r})")
            setattr(namespace, self.dest, False)
        elif values is None:
            setattr(namespace, self.dest, True)
        elif values.lower() in _TRUE + _FALSE:
            setattr(namespace, self.dest, values.lower() in _TRUE)
        else:
            parser.error(f"{option_string}: expected true or false, got {values!r}")


class ConfigHelpFormatter(LazyHelpFormatter):
    """Resolves lazy help (callables) and shows a boolean as ``--flag, --no-flag``."""

    def _format_action_invocation(self, action):
        if isinstance(action, _BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def _shown(default) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "empty"
    if isinstance(default, bool):
        return str(default).lower()
    return "empty" if default == "" else str(default)


def _mode_lines() -> str:
    from linft.runs.modes import MODES
    return "; ".join(f"{name}: trains {m.trains}" for name, m in MODES.items())


def _help(doc: FieldDoc, choices: _LazyChoices | None):
    def text() -> str:
        out = doc.help
        if choices is not None:
            out += "; " + (_mode_lines() if doc.name == "mode" else "one of " + ", ".join(map(str, choices)))
        return f"{out} (default: {_shown(doc.default)})".replace("%", "%%")
    return text if callable(doc.choices) else text()


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, its help written once in the field's metadata."""
    groups = {True: p.add_argument_group("run config (these fields make the run id)"),
              False: p.add_argument_group("run options (never change the run id)")}
    for doc in field_docs():
        flag, dest = "--" + doc.name.replace("_", "-"), f"cfg_{doc.name}"
        choices = _LazyChoices(doc.choices) if doc.choices is not None else None
        g = groups[doc.semantic]
        if doc.type == "bool":
            g.add_argument(flag, dest=dest, action=_BoolFlag, default=None, help=_help(doc, None))
            continue
        metavar = doc.metavar or {"int": "INT", "float": "FLOAT", "str": "STR"}.get(doc.type, "A,B,...")
        if choices is not None:
            metavar = "{" + ",".join(choices) + "}" if not callable(doc.choices) else "MODE"
        g.add_argument(flag, dest=dest, default=None, metavar=metavar, choices=choices, help=_help(doc, choices))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_file(args.config).to_dict() if getattr(args, "config", None) else {}
    flags = {d.name: getattr(args, f"cfg_{d.name}") for d in field_docs()
             if getattr(args, f"cfg_{d.name}", None) is not None}
    if "weights_file" in flags and "weights_sha256" not in flags:
        base.pop("weights_sha256", None)  # a weights file given here: the run id follows its content
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


# -- run folders -------------------------------------------------------------------------------
def _run_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise LinftError(f"no runs folder {str(root)!r}")
    return sorted(p for p in root.iterdir() if (p / "config.json").exists())


def disk_usage(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks not followed)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def distinguishing_fields(configs: list[dict]) -> list[str]:
    """The semantic fields whose values differ among ``configs`` (a missing field: its default)."""
    out = []
    for doc in field_docs():
        if not doc.semantic or doc.name == "mode":
            continue
        default = list(doc.default) if isinstance(doc.default, tuple) else doc.default
        if len({json.dumps(c.get(doc.name, default), sort_keys=True) for c in configs}) > 1:
            out.append(doc.name)
    return out


def _last_step(d: Path) -> int:
    step, rows = 0, d / "results.jsonl"
    if rows.exists():
        for line in rows.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                pass
    return step


def _runs_ls(args) -> int:
    from linft.runs.store import run_state
    runs = _run_folders(Path(args.root))
    configs = [json.loads((d / "config.json").read_text()) for d in runs]
    diff = distinguishing_fields(configs)

    def cell(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)
    table = [["run", "state", "step", "disk", "mode", *diff]]
    for d, cfg in zip(runs, configs):
        table.append([d.name, run_state(d), str(_last_step(d)), human_bytes(disk_usage(d)), cfg.get("mode", "full"),
                      *(cell(cfg.get(f, "")) for f in diff)])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 0


def _runs_gc(args) -> int:
    """Delete checkpoint.pt of finished runs (final.pt, rows and config stay: the run is still done
    and analysable); ``--dry-run`` only says what would go."""
    total, n = 0, 0
    for d in _run_folders(Path(args.root)):
        ck = d / "checkpoint.pt"
        if (d / "done").exists() and ck.is_file():
            size = ck.stat().st_size
            total, n = total + size, n + 1
            if not args.dry_run:
                ck.unlink()
            print(f"{'would delete' if args.dry_run else 'deleted'} {ck} ({human_bytes(size)})")
    print(f"{'would reclaim' if args.dry_run else 'reclaimed'} {human_bytes(total)} from {n} finished run(s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train one run (resumes if interrupted; returns at once if done)",
                       formatter_class=ConfigHelpFormatter,
                       description="Train one run. Prints the run folder, one line per evaluation as it "
                                   "happens, then the selected test accuracies, all on stdout (a progress bar "
                                   "on stderr when it is a terminal; errors on stderr, one line).")
    p.add_argument("--config", help="a JSON or TOML file of RunConfig fields; flags override it")
    p.add_argument("--root", default="runs", help="runs folder (default: ./runs)")
    add_config_flags(p)
    p.set_defaults(func=_train)
    runs = sub.add_parser("runs", help="inspect and tidy run folders").add_subparsers(dest="runs_cmd", required=True)
    ls = runs.add_parser("ls", help="list runs: state, last step, disk, and the config fields that tell them apart")
    ls.add_argument("root")
    ls.set_defaults(func=_runs_ls)
    gc = runs.add_parser("gc", help="delete checkpoint.pt of finished runs (final.pt stays) and print the space reclaimed")
    gc.add_argument("root")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.set_defaults(func=_runs_gc)
