"""flor_lightning: hindsight logging for PyTorch Lightning.

Record a run with ``Trainer(callbacks=[FlorCallback()])`` (or ``flor.Trainer``), and read
every logged value back with ``flor.query()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flor_lightning.callback import FlorCallback
from flor_lightning.errors import CheckpointError, ConfigError, FlorError, GitError, ReplayError, StoreError
from flor_lightning.multiversion import VersionReplay, format_report, replay_runs
from flor_lightning.query import export, query, records, runs
from flor_lightning.resume import last_checkpoint
from flor_lightning.trainer import Trainer

if TYPE_CHECKING:
    from flor_lightning.lightning_cli import LightningCLI

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FlorCallback",
    "FlorError",
    "GitError",
    "LightningCLI",
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


def __getattr__(name: str) -> Any:
    # LightningCLI imports jsonargparse, which configures itself on import: only on first use.
    if name == "LightningCLI":
        from flor_lightning.lightning_cli import LightningCLI

        return LightningCLI
    raise AttributeError(f"module 'flor_lightning' has no attribute {name!r}")
