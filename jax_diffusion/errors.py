"""The user-error family: problems a user can fix, which main.py prints as one line.

Anything raised that is not a `UserError` is a bug and keeps its traceback. Each subclass also
derives from the built-in type its callers used to catch (ValueError, FileNotFoundError, ...),
so library users who catch those keep working.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config value is invalid: the message names the key, the value and what is allowed."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model in the config."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset named by config.data.dataset is not prepared and cannot be prepared here."""


class DistributedSetupError(UserError, RuntimeError):
    """The processes of a multi-process run could not be joined."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradient became NaN or Inf."""


class InceptionWeightsNotFoundError(UserError, FileNotFoundError):
    """The FID Inception weights file is absent and may not be downloaded."""


class InputFileError(UserError, ValueError):
    """A file the user pointed at (samples, statistics, weights) is missing or malformed."""


class MissingInputFileError(InputFileError, FileNotFoundError):
    """A file the user pointed at does not exist."""


class DownloadError(UserError, OSError):
    """A download failed, was interrupted or did not match its expected SHA-256."""


class UnsafePickleError(UserError, ValueError):
    """A pickle asked to run something other than rebuilding tensors: refused, never executed."""


class ConversionError(UserError, ValueError):
    """A checkpoint to import or export does not fit the model in the config."""


class MissingDependencyError(UserError, ImportError):
    """An optional package is needed for what was asked; the message says which to install."""
