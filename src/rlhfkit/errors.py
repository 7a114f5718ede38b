"""Errors that reach the user. Each says what was wrong and how to fix it; the CLI prints them without a traceback."""


class RlhfkitError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class DataError(RlhfkitError, ValueError):
    """A data file is malformed. The message starts with `file:line:`."""


class ConfigError(RlhfkitError, ValueError):
    """A configuration is invalid or cannot run on this machine."""


class ModelNotFoundError(RlhfkitError, LookupError):
    """A model name resolved to nothing. The message lists what was tried."""


class OutputExistsError(RlhfkitError, FileExistsError):
    """An output directory already holds results and overwriting was not asked for."""
