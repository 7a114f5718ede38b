"""Errors that reach the user. Each says what was wrong and how to fix it; the CLI prints them without a traceback."""


class RlhfkitError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class DataError(RlhfkitError, ValueError):
    """A data file is malformed. The message starts with `file:line:` (or `dataset row N:`)."""


class ConfigError(RlhfkitError, ValueError):
    """A configuration is invalid or cannot run on this machine."""


class ModelNotFoundError(RlhfkitError, LookupError):
    """A model name resolved to nothing. The message lists what was tried."""


class OutputError(RlhfkitError, OSError):
    """An output cannot be written where it was asked for (a file in the way, no permission, a full disk)."""


class OutputExistsError(OutputError, FileExistsError):
    """An output directory already holds results and overwriting was not asked for."""


class NonFiniteError(RlhfkitError):
    """Too many updates had a NaN or Inf loss (or, without fp16 loss scaling, NaN or Inf gradients)."""
