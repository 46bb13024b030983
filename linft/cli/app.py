"""Command line: thin parse -> call. User errors print one line and exit 2 (no traceback).

Building the parser imports no torch, pandas or plotting library: every command imports what it
needs when it runs (``linft --help`` answers in well under a second)."""
from __future__ import annotations

import argparse
import sys
import warnings

from linft.errors import LinftError


def _command(argv: list[str]) -> str:
    """The sub-command ``argv`` invokes ("" for none, e.g. ``linft --help``): the top-level parser
    has options without values only, so it is the first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), "")


def _build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given ``argv``, heavy command groups that ``argv`` does not invoke are
    stubs (linft.cli.commands), so that building it imports no torch, pandas or plotting library."""
    from linft import __version__
    parser = argparse.ArgumentParser(prog="linft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"linft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if argv is not None:
        sub.linft_command = _command(argv)
    from linft.cli.commands import register_all
    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # timm/torchvision import-time deprecation noise is not the user's business
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser(argv)
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
