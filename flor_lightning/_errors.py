"""Errors raised by flor_lightning.

Every error a user can meet derives from :class:`FlorError` and says what was expected,
what was found and what to do::

    FlorError
    ├── ConfigError       bad argument or environment (paths, URLs, callback set-up)
    ├── StoreError        the log store (.flor/flor.db) is unreadable, foreign or damaged
    ├── CheckpointError   a checkpoint is missing, corrupt or does not fit the model
    ├── GitError          the shadow branch could not be written
    └── ReplayError       a replay cannot start or continue (unknown run, bad epochs, ...)
"""

from __future__ import annotations


class FlorError(Exception):
    """Base class of every error raised by flor_lightning."""


class ConfigError(FlorError, ValueError):
    """An argument or environment setting is invalid."""


class StoreError(FlorError):
    """The log store cannot be opened or written."""


class CheckpointError(FlorError):
    """A checkpoint is missing, corrupt or incompatible with the model."""


class GitError(FlorError):
    """The code snapshot could not be committed to the shadow branch."""


class ReplayError(FlorError):
    """A replay cannot be planned or run."""
