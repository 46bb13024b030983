"""User-facing errors: one readable message each, never a traceback from the CLI."""


class LinftError(Exception):
    """A problem with the user's input (config, data, weights), not a bug in linft.

    The CLI prints ``str(err)`` on one line and exits with status 2.
    """


class BackboneError(LinftError):
    """Unknown backbone name, missing weights file, or weights of another architecture."""


class ConfigError(LinftError, ValueError):
    """A config value outside its valid range (p outside [0, 1), k larger than the block count...)."""


class LinearizationError(LinftError, RuntimeError):
    """A module that cannot be linearized as asked (train-mode BatchNorm, no parameters...)."""
