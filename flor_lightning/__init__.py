"""flor_lightning: hindsight logging for PyTorch Lightning.

Record a run with ``Trainer(callbacks=[FlorCallback()])`` (or ``flor.Trainer``), and read
every logged value back with ``flor.query()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flor_lightning.errors import CheckpointError, ConfigError, FlorError, GitError, ReplayError, StoreError

# Eager: importing the submodule flor_lightning.query would otherwise shadow the function query.
from flor_lightning.query import export, query, records, runs

if TYPE_CHECKING:
    from flor_lightning.callback import FlorCallback
    from flor_lightning.housekeeping import gc, push
    from flor_lightning.lightning_cli import LightningCLI
    from flor_lightning.multiversion import VersionReplay, format_report, replay_runs
    from flor_lightning.resume import last_checkpoint
    from flor_lightning.trainer import Trainer

# Imported on first use, so that ``flor --help`` or ``flor runs`` need not load torch and Lightning.
_LAZY = {
    "FlorCallback": "callback",
    "LightningCLI": "lightning_cli",  # jsonargparse configures itself on import
    "Trainer": "trainer",
    "VersionReplay": "multiversion",
    "format_report": "multiversion",
    "gc": "housekeeping",
    "push": "housekeeping",
    "last_checkpoint": "resume",
    "replay_runs": "multiversion",
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
