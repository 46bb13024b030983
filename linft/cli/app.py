"""Command line: thin parse -> call. User errors print one line and exit 2 (no traceback).

Building the parser imports no torch, pandas or plotting library: every command imports what it
needs when it runs (``linft --help`` answers in well under a second)."""
from __future__ import annotations

import argparse
import signal
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


INTERRUPTED = "linft: interrupted; finished results are kept and the run resumes when launched again."


class _Interrupts:
    """SIGINT handler. While the command line starts (building the parser imports torch,
    torchvision, pandas...) a Ctrl-C is only noted and acted on once the imports are done: an
    import cut half-way leaves a module broken that fails later with an unrelated error (e.g. a
    RecursionError inside numpy). Afterwards it raises KeyboardInterrupt as usual, and any error
    that follows a Ctrl-C is reported as the interruption, in one line."""

    def __init__(self) -> None:
        self.seen, self.defer = False, True

    def __call__(self, signum, frame) -> None:
        self.seen = True
        if not self.defer:
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # timm/torchvision import-time deprecation noise is not the user's business
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    intr, restore = _Interrupts(), False
    try:
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.SIG_IGN:  # keep ignoring where the caller ignores it
            signal.signal(signal.SIGINT, intr)
            restore = True
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        parser = _build_parser(argv)
        args = parser.parse_args(argv)
        intr.defer = False
        if intr.seen:
            raise KeyboardInterrupt
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:
        if intr.seen:  # an error caused by the interruption (a half-done import, a closed pipe...)
            print(INTERRUPTED, file=sys.stderr)
            return 130
        if isinstance(e, LinftError):
            print(f"linft: error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        if restore:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
