"""flor_lightning: hindsight logging for PyTorch Lightning.

Record a run with ``Trainer(callbacks=[FlorCallback()])`` (or ``flor.Trainer``), and read
every logged value back with ``flor.query()``.
"""

from __future__ import annotations

from flor_lightning.callback import FlorCallback
from flor_lightning.errors import CheckpointError, ConfigError, FlorError, GitError, ReplayError, StoreError
from flor_lightning.multiversion import VersionReplay, format_report, replay_runs
from flor_lightning.query import export, query, records, runs
from flor_lightning.resume import last_checkpoint
from flor_lightning.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlorCallback",
    "FlorError",
    "GitError",
    "ReplayError",
    "StoreError",
    "Trainer",
    "VersionReplay",
    "__version__",
    "export",
    "format_report",
    "last_checkpoint",
    "query",
    "records",
    "replay_runs",
    "runs",
]
