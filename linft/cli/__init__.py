"""The command line: thin parse -> call, one module per command group."""
from linft.cli.app import main

__all__ = ["main"]
