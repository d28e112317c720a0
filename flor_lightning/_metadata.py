"""What a run's row says about it: hyperparameters, Trainer settings, data sizes, versions, code.

Gathered from the Trainer and the module as plain dicts; the run session writes them
(:mod:`flor_lightning._session`) and replay compares them with what it is given.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
import torch

from flor_lightning._locate import Location, relative, script

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from flor_lightning._shadow import CodeVersion


def new_run_id(now: float) -> str:
    """A sortable, unique run id such as ``20261128-120501-3f9a1c``, for a run started at ``now``."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{uuid.uuid4().hex[:6]}"


def hyperparameters(
    pl_module: pl.LightningModule, trainer: pl.Trainer | None, datamodule: Any = None
) -> dict[str, Any]:
    """The module's saved hyperparameters merged with the datamodule's (the trainer's, or ``datamodule``;
    prefixed on a clash)."""
    out: dict[str, Any] = dict(pl_module.hparams)
    dm = getattr(trainer, "datamodule", None) or datamodule
    for key, value in (dict(dm.hparams) if getattr(dm, "hparams", None) is not None else {}).items():
        out[f"datamodule.{key}" if key in out else key] = value
    return out


def data_sizes(trainer: pl.Trainer) -> dict[str, Any]:
    """Batches per epoch, known once the fit loop has set up its data, and torch's thread count
    (which a multi-process strategy may have changed by then)."""
    val = trainer.num_val_batches
    return {
        "torch_threads": torch.get_num_threads(),  # float reductions differ across thread counts
        "num_training_batches": trainer.num_training_batches,
        "num_val_batches": list(val) if isinstance(val, list) else val,
    }


def trainer_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """Trainer settings that decide whether a replay can reproduce the run."""
    return {
        "max_epochs": trainer.max_epochs,
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "precision": str(trainer.precision),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "num_devices": trainer.num_devices,
        "limit_train_batches": trainer.limit_train_batches,
        "limit_val_batches": trainer.limit_val_batches,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "val_check_interval": trainer.val_check_interval,
        "gradient_clip_val": trainer.gradient_clip_val,
    }


def run_row(
    run_id: str,
    *,
    loc: Location,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    version: CodeVersion | None,
    checkpoint_root: str | None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``runs`` row describing run ``run_id``: its script and arguments (``argv``, default
    ``sys.argv``), hyperparameters, Trainer settings, versions, code ``version`` (None: no snapshot)
    and checkpoint root. The run session adds what it owns: start, status and process."""
    argv = sys.argv if argv is None else argv
    return {
        "run_id": run_id,
        "project": loc.project,
        "script": script(loc, argv),
        "argv": list(argv[1:]),
        "cwd": relative(Path.cwd(), loc.root),
        "hparams": hyperparameters(pl_module, trainer),
        "settings": trainer_settings(trainer),
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "shadow_commit": version.shadow_commit if version else None,
        "head_commit": version.head_commit if version else None,
        "branch": version.branch if version else None,
        "checkpoint_root": checkpoint_root,
        "left_out": dict(version.left_out) if version else None,
    }
