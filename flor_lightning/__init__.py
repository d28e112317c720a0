"""flor_lightning: hindsight logging for PyTorch Lightning.

Record a run with ``Trainer(callbacks=[FlorCallback()])`` (or ``flor.Trainer``), replay it with
``flor.Trainer(...).replay(model, datamodule=dm)`` once new logging is added, and read every
logged value back with ``flor.query()``.

Everything public is exported here; the modules behind it (``flor_lightning._store``, ...) are
private and may change between releases.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flor_lightning._errors import (
    BadCheckpoint,
    BlobError,
    CheckpointError,
    CommandProblem,
    ConfigError,
    FlorError,
    GitError,
    ReplayError,
    StoreError,
    UnknownRunError,
)
from flor_lightning._query import export, query, records, runs

if TYPE_CHECKING:
    from flor_lightning._callback import FlorCallback, RecordStats
    from flor_lightning._housekeeping import gc, push
    from flor_lightning._lightning_cli import LightningCLI
    from flor_lightning._multiversion import VersionReplay, format_report, replay_runs
    from flor_lightning._report import ReplayReport
    from flor_lightning._resume import last_checkpoint
    from flor_lightning._tracker_export import export_mlflow, export_tensorboard
    from flor_lightning._trainer import Trainer

# Imported on first use, so that ``flor --help`` or ``flor runs`` need not load torch and Lightning.
_LAZY = {
    "FlorCallback": "_callback",
    "LightningCLI": "_lightning_cli",  # jsonargparse configures itself on import
    "RecordStats": "_callback",
    "ReplayReport": "_report",
    "Trainer": "_trainer",
    "VersionReplay": "_multiversion",
    "export_mlflow": "_tracker_export",
    "export_tensorboard": "_tracker_export",
    "format_report": "_multiversion",
    "gc": "_housekeeping",
    "last_checkpoint": "_resume",
    "push": "_housekeeping",
    "replay_runs": "_multiversion",
}

__version__ = "0.1.0"

__all__ = [
    "BadCheckpoint",
    "BlobError",
    "CheckpointError",
    "CommandProblem",
    "ConfigError",
    "FlorCallback",
    "FlorError",
    "GitError",
    "LightningCLI",
    "RecordStats",
    "ReplayError",
    "ReplayReport",
    "StoreError",
    "Trainer",
    "UnknownRunError",
    "VersionReplay",
    "__version__",
    "export",
    "export_mlflow",
    "export_tensorboard",
    "format_report",
    "gc",
    "last_checkpoint",
    "push",
    "query",
    "records",
    "replay_runs",
    "runs",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flor_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flor_lightning.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
