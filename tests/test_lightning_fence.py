"""Canaries on the Lightning internals that ``flor_lightning._lightning`` relies on.

``_lightning.py`` is the one module that touches private Lightning API, pinned to a tested
Lightning range. These tests fail loudly, naming what to review, when a Lightning release
changes what that module mirrors or rewrites, instead of letting replay drift silently.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import os
import signal
import textwrap
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultCollection, _Sync
from lightning.pytorch.utilities.combined_loader import _MaxSizeCycle
from lightning.pytorch.utilities.exceptions import SIGTERMException
from models import DigitsClassifier, DigitsData, trainer_kwargs
from torch.utils.data.dataloader import _BaseDataLoaderIter

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


# The same for each method whose behaviour the mid-epoch restart (flor_lightning._lightning: capture_mid_epoch,
# resume_mid_epoch, fast_forward) is built on, with what it relies on; torch's DataLoader iterator included.
RELIED_ON = {
    # the restart stages read from a capture's loop progress (on_validation_end: RESTARTED_ON_LAST;
    # on_train_batch_end: RESTARTED_ON_TRAIN_BATCH_END) and what each one increments; the not-resumable warning
    _TrainingEpochLoop.update_restart_stage: "e8f3ffd8cf83c8a9",
    _TrainingEpochLoop.reset: "eec15d914fda4529",
    # a restart skips the validation due after the restored batch (why no batch-end capture is taken there)
    _TrainingEpochLoop.advance: "8afcd55fc9ff0912",
    # no new data iterator while restarting; fetched += the batches done
    _TrainingEpochLoop.on_run_start: "50e0f42df86d26ac",
    # RESTARTED_MID_EPOCH: no epoch-start hooks (on_advance_start), the sampler's set_epoch
    _FitLoop.update_restart_stage: "2098623741c06303",
    _FitLoop.on_advance_start: "fec1de82764dda3c",
    # the first epoch's iterator is made here, after the stateful loaders load their states
    _FitLoop.setup_data: "8dd5f7d4374f7182",
    # the first self.log of a batch resets the aggregates unless _first_loop_iter is False
    _LoggerConnector.should_reset_tensors: "28521dcccae8beb3",
    # how a logged value's _ResultMetric, _Metadata and _Sync are built (_restore_results rebuilds them)
    _ResultCollection.log: "77b69049fed03c9c",
    # validation's results (and the Metrics logged in them) are reset right after the on_validation_end hooks
    _EvaluationLoop._on_evaluation_end: "757c5c04977761b3",
    # one training loader's batches come from iterators[0]; _idx counts them
    _MaxSizeCycle.__next__: "d5307eac972e74aa",
    # the base seed is drawn as the iterator is made; a batch is _next_index() then a fetch, counted in _num_yielded
    _BaseDataLoaderIter.__init__: "ee11b215bf7356f6",
    _BaseDataLoaderIter.__next__: "6eb7bc3c6cec0b91",
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


@pytest.mark.parametrize("fn", list(RELIED_ON), ids=lambda fn: fn.__qualname__)
def test_the_lightning_methods_a_mid_epoch_restart_relies_on_are_unchanged(fn: Any) -> None:
    assert tree_hash(fn) == RELIED_ON[fn], (
        f"{fn.__module__}.{fn.__qualname__} changed; the mid-epoch restart in flor_lightning._lightning relies on it "
        "(see the comment above it in RELIED_ON). Review the change against capture_mid_epoch, resume_mid_epoch and "
        "fast_forward, run tests/test_midepoch.py, then update RELIED_ON."
    )


def test_the_fields_a_mid_epoch_capture_rebuilds_logged_values_from_are_unchanged() -> None:
    # _results_state saves every _Metadata field but _sync; _restore_results rebuilds _Sync from these
    assert [f.name for f in dataclasses.fields(_Sync)] == ["fn", "_should", "rank_zero_only", "_op", "_group"]
    assert "_sync" in {f.name for f in dataclasses.fields(_Metadata)}
    assert set(_lightning._REDUCTIONS.values()) >= {torch.mean, torch.max, torch.min, torch.sum}


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
