"""Help text computed only when shown, so that building the parser imports nothing heavy (a list
of datasets or modes lives in modules that import torch)."""
from __future__ import annotations

import argparse


class LazyHelpFormatter(argparse.HelpFormatter):
    """An argument's ``help`` may be a zero-argument callable returning the text."""

    def _format_action(self, action):
        if callable(action.help):
            action.help = action.help()
        return super()._format_action(action)
