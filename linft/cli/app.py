"""Command line: thin parse -> call. User errors print one line and exit 2 (no traceback).

Building the parser imports no torch, pandas or plotting library: every command imports what it
needs when it runs (``linft --help`` answers in well under a second)."""
from __future__ import annotations

import argparse
import sys
import warnings

from linft.errors import LinftError


def _build_parser() -> argparse.ArgumentParser:
    from linft import __version__
    parser = argparse.ArgumentParser(prog="linft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"linft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from linft.cli.commands import register_all
    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # timm/torchvision import-time deprecation noise is not the user's business
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
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
