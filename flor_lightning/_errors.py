"""Errors raised by flor_lightning.

Every error a user can meet derives from :class:`FlorError` and says what was expected,
what was found and what to do::

    FlorError
    ├── ConfigError        bad argument or environment (paths, URLs, callback set-up)
    ├── UnknownRunError    a run id the log store does not hold (also a LookupError)
    ├── StoreError         the log store (.flor/flor.db) is unreadable, foreign or damaged
    ├── CheckpointError    a checkpoint is missing, corrupt or does not fit the model
    │   ├── BadCheckpoint  one checkpoint of a replay is unusable (``epoch`` names it; replay re-plans)
    │   └── BlobError      a tensor blob of a checkpoint is missing or corrupt (``checkpoint``, ``tensor``)
    ├── GitError           the shadow branch could not be written
    ├── ReplayError        a replay cannot start or continue (bad epochs, failed segments, ...)
    └── CommandProblem     the ``flor`` command ran and found something wrong (exit status 1)

The ``flor`` command exits with status 2 for a :class:`ConfigError` (bad input) and 1 for any other.
"""

from __future__ import annotations


class FlorError(Exception):
    """Base class of every error raised by flor_lightning."""


class ConfigError(FlorError, ValueError):
    """An argument or environment setting is invalid."""


class UnknownRunError(FlorError, LookupError):
    """A run id the log store does not hold.

    Attributes:
        unknown: the ids asked for that the store does not hold.
        latest: the ids of the latest runs it does hold (newest first), to choose from.
    """

    def __init__(self, unknown: list[str], latest: list[str]) -> None:
        which = f"run id {unknown[0]!r}" if len(unknown) == 1 else f"run ids {unknown}"
        hint = f"the latest runs are {latest}" if latest else "no run is recorded in this store yet"
        super().__init__(f"unknown {which}; {hint} (`flor runs` or flor.runs() lists every one)")
        self.unknown, self.latest = unknown, latest


class StoreError(FlorError):
    """The log store cannot be opened or written."""


class CheckpointError(FlorError):
    """A checkpoint is missing, corrupt or incompatible with the model."""


class GitError(FlorError):
    """The code snapshot could not be committed to the shadow branch."""


class ReplayError(FlorError):
    """A replay cannot be planned or run."""


class BadCheckpoint(CheckpointError):
    """A checkpoint of a replay that is missing or fails its checksum; ``epoch`` names it."""

    def __init__(self, epoch: int, message: str) -> None:
        super().__init__(message)
        self.epoch = epoch


class BlobError(CheckpointError):
    """A tensor blob of a checkpoint is missing or corrupt.

    Attributes:
        checkpoint: the manifest's name.
        tensor: the tensor's path in the state, dotted (``state_dict.net.0.weight``).
    """

    def __init__(self, checkpoint: str, tensor: str, problem: str) -> None:
        super().__init__(
            f"checkpoint {checkpoint!r}: tensor {tensor!r} {problem}. "
            "Load an earlier checkpoint, or record the run again"
        )
        self.checkpoint = checkpoint
        self.tensor = tensor


class CommandProblem(FlorError):
    """The ``flor`` command ran but found something wrong (exit status 1)."""
