"""flor_lightning: hindsight logging for PyTorch Lightning.

Record a run with ``Trainer(callbacks=[FlorCallback()])`` (or ``flor.Trainer``), and read
every logged value back with ``flor.query()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flor_lightning._errors import CheckpointError, ConfigError, FlorError, GitError, ReplayError, StoreError

# Eager: importing the submodule flor_lightning._query would otherwise shadow the function query.
from flor_lightning._query import export, query, records, runs

if TYPE_CHECKING:
    from flor_lightning._callback import FlorCallback
    from flor_lightning._housekeeping import gc, push
    from flor_lightning._lightning_cli import LightningCLI
    from flor_lightning._multiversion import VersionReplay, format_report, replay_runs
    from flor_lightning._resume import last_checkpoint
    from flor_lightning._trainer import Trainer

# Imported on first use, so that ``flor --help`` or ``flor runs`` need not load torch and Lightning.
_LAZY = {
    "FlorCallback": "_callback",
    "LightningCLI": "_lightning_cli",  # jsonargparse configures itself on import
    "Trainer": "_trainer",
    "VersionReplay": "_multiversion",
    "format_report": "_multiversion",
    "gc": "_housekeeping",
    "push": "_housekeeping",
    "last_checkpoint": "_resume",
    "replay_runs": "_multiversion",
}

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
