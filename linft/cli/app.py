"""Command line: thin parse -> call. User errors print one line and exit 2 (no traceback)."""
from __future__ import annotations

import argparse
import sys
import warnings

from linft.errors import LinftError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from linft.cli.commands import register_all
    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # timm/torchvision import-time deprecation noise is not the user's business
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    try:  # the parser imports the command modules (torch among them): Ctrl-C there is one line too
        parser = _build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except LinftError as e:
        print(f"linft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linft: interrupted; finished results are kept and the run resumes when launched again.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
