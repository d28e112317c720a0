"""Canaries on the Lightning internals that ``flor_lightning._lightning`` relies on.

``_lightning.py`` is the one module that touches private Lightning API, pinned to a tested
Lightning range. These tests fail loudly, naming what to review, when a Lightning release
changes what that module mirrors or rewrites, instead of letting replay drift silently.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import signal
import textwrap
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.utilities.exceptions import SIGTERMException
from models import DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import _lightning

# sha256 (first 16 hex digits) of the syntax tree of each Lightning method that ReplayFitLoop mirrors,
# as of the Lightning release in requirements-cpu.txt. A new value means the method changed upstream.
MIRRORED = {
    # ReplayFitLoop._restored_epoch_end is this method without the scheduler step
    _FitLoop.on_advance_end: "591b96e0ca39e3ef",
    # ReplayFitLoop.advance runs validation the way this method does (validating flag, _first_loop_iter)
    _TrainingEpochLoop.on_advance_end: "14d3e228f8bab057",
}


def tree_hash(fn: Any) -> str:
    tree = ast.dump(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    return hashlib.sha256(tree.encode()).hexdigest()[:16]


@pytest.mark.parametrize("fn", list(MIRRORED), ids=lambda fn: fn.__qualname__)
def test_the_lightning_methods_replay_mirrors_are_unchanged(fn: Any) -> None:
    assert tree_hash(fn) == MIRRORED[fn], (
        f"Lightning changed {fn.__qualname__}; flor_lightning._lightning.ReplayFitLoop mirrors it. Review "
        "the upstream change, carry it into ReplayFitLoop (_restored_epoch_end / advance), then update MIRRORED."
    )


class _DumpAtEpochStart(L.Callback):
    """Keeps the fit loop's checkpoint state as flor takes it: as the second epoch starts."""

    fit_state: dict[str, Any] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.fit_state = trainer._checkpoint_connector.dump_checkpoint()["loops"]["fit_loop"]


@pytest.mark.integration
def test_the_checkpoint_keys_as_between_epochs_rewrites_exist(project: Any) -> None:
    dump = _DumpAtEpochStart()
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=[dump]))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    fit = dump.fit_state
    assert fit is not None
    counters = {"ready", "started", "processed", "completed"}
    where = "flor_lightning._lightning._as_between_epochs rewrites it; review that function for this Lightning"
    batches = fit["epoch_loop.batch_progress"]
    assert set(batches["current"]) == counters and "is_last_batch" in batches, where
    assert batches["current"]["completed"] > 0, where  # the stale counts the rewrite exists to clear
    assert set(fit["epoch_loop.scheduler_progress"]["current"]) == {"ready", "completed"}, where
    optimizers = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
    assert set(optimizers) == {"step", "zero_grad"}, where
    assert all("current" in progress for progress in optimizers.values()), where
    assert "current" in fit["epoch_loop.manual_optimization.optim_step_progress"], where
    assert set(fit["epoch_loop.val_loop.batch_progress"]["total"]) == counters, where

    _lightning._as_between_epochs(fit)
    assert set(batches["current"].values()) == {0} and batches["is_last_batch"] is False
    assert set(fit["epoch_loop.val_loop.batch_progress"]["total"].values()) == {0}
    assert all(set(p["current"].values()) == {0} for p in optimizers.values())


class _SigtermAfterFirstEpoch(L.Callback):
    """Sends this process SIGTERM in the first epoch's end hook; Lightning's handler flags the trainer."""

    def __init__(self) -> None:
        self.epochs_ended: list[int] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_ended.append(trainer.current_epoch)
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.integration
def test_a_restored_epoch_end_stops_on_sigterm_as_lightning_does(project: Any) -> None:
    L.seed_everything(0)
    flor.Trainer(**trainer_kwargs()).fit(DigitsClassifier(), datamodule=DigitsData())
    sigterm = _SigtermAfterFirstEpoch()
    # one validation batch: Lightning's evaluation loop checks the flag only between batches, so without the
    # check at the restored epoch's end the replay would run every epoch
    trainer = flor.Trainer(**trainer_kwargs(callbacks=[sigterm], limit_val_batches=1))
    with pytest.raises(SIGTERMException):
        trainer.replay(DigitsClassifier(), datamodule=DigitsData(), train=False)
    assert sigterm.epochs_ended == [0]
