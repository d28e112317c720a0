"""What the children of the fork server (zygote.py) run: recordings and replays in their own process.

Each function runs in a fresh child whose working directory, environment and ``sys.argv`` are
those of the test that forked it, as if ``python train.py`` had been started there. A child
reports what it has done through :data:`emit` (one line to the test per call).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from models import DigitsClassifier, DigitsData, trainer_kwargs
from torch import nn

import flor_lightning as flor
from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore

emit: Callable[[str], None] = lambda text: None  # noqa: E731  (replaced by the zygote in each child)

VALUES_PER_STEP = 50


class BigClassifier(DigitsClassifier):
    """About a million parameters (a 13 MB checkpoint with Adam's state) and many values per step,
    so that checkpoint writes and log flushes take long enough for a kill to land inside them."""

    def __init__(self) -> None:
        super().__init__(hidden=1024)
        self.net = nn.Sequential(
            nn.Linear(64, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        for k in range(VALUES_PER_STEP):
            self.log(f"m{k:02d}", loss.detach() + k)
        return loss


class HindsightClassifier(DigitsClassifier):
    """The digits model with one more validation metric, as a user adds it before a replay."""

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        super()._evaluate(batch, prefix)
        x, _ = batch
        self.log(f"{prefix}_conf", self(x).softmax(1).max(1).values.mean())


class Reporter(L.Callback):
    """Attached after FlorCallback: says which run is recording once it is open."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        emit(f"run {trainer.flor.run_id}")  # type: ignore[attr-defined]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        emit(f"epoch-end {trainer.current_epoch}")


class Gate(L.Callback):
    """Holds the recording at the end of its first epoch until ``path`` exists (at most 120 s),
    so that a test can run something else while the recording is open for certain."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        deadline = time.monotonic() + 120
        while trainer.current_epoch == 0 and not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.01)


def _instrument() -> None:
    """Report each checkpoint write and each log flush as it begins and once it is durable.

    ``flush-begin N P``: the run has N rows stored and at least P rows go into this batch;
    ``flushed N`` is written after the batch's COMMIT returned, with the run's row count then;
    ``ckpt-end E`` after the file was renamed into place and indexed.
    """
    write_checkpoint = CheckpointStore._write

    def _write(self: CheckpointStore, state: Any, name: str, epoch: int, step: int, on_done: Any) -> None:
        emit(f"ckpt-begin {epoch}")
        write_checkpoint(self, state, name, epoch, step, on_done)
        if self._error is None:
            emit(f"ckpt-end {epoch}")

    write_logs = store.LogWriter._write

    def _flush(self: store.LogWriter, conn: Any) -> None:
        if not self._pending:
            return
        run_id = self._pending[0][0]
        count = "SELECT count(*) FROM logs WHERE run_id = ?"
        emit(f"flush-begin {conn.execute(count, [run_id]).fetchone()[0]} {self.backlog}")
        write_logs(self, conn)
        emit(f"flushed {conn.execute(count, [run_id]).fetchone()[0]}")

    CheckpointStore._write = _write  # type: ignore[method-assign]
    store.LogWriter._write = _flush  # type: ignore[method-assign]


def _wait_until(start_at: float | None) -> None:
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))


def record_until_killed(*, flush_interval: float, train_batches: int) -> None:
    """Record the big model for ever (the test kills it), reporting writes and flushes."""
    os.nice(5)  # on a machine with few cores, the test that aims the kill gets the CPU when it wakes
    torch.set_num_threads(1)
    _instrument()
    L.seed_everything(0, verbose=False)
    callbacks = [flor.FlorCallback(flush_interval=flush_interval), Reporter()]
    kwargs = trainer_kwargs(max_epochs=1_000_000, limit_train_batches=train_batches, limit_val_batches=1)
    flor.Trainer(callbacks=callbacks, **kwargs).fit(BigClassifier(), datamodule=DigitsData())


def record(
    *, out: str, max_epochs: int = 3, start_at: float | None = None, flush_interval: float = 1.0, gate: str = ""
) -> None:
    """Record the digits model (seed 0) and write ``{"run_id": ...}`` to ``out``; with ``gate``,
    hold after the first epoch until that file exists (:class:`Gate`)."""
    torch.set_num_threads(1)
    _wait_until(start_at)
    L.seed_everything(0, verbose=False)
    callbacks: list[L.Callback] = [flor.FlorCallback(flush_interval=flush_interval), Reporter()]
    callbacks += [Gate(gate)] if gate else []
    trainer = flor.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=max_epochs))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    with open(out, "w") as f:
        json.dump({"run_id": trainer.flor.run_id}, f)


def replay(*, run_id: str, out: str, start_at: float | None = None) -> None:
    """Replay ``run_id`` with :class:`HindsightClassifier` (restoring) and write the report to ``out``."""
    torch.set_num_threads(1)
    _wait_until(start_at)
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(**trainer_kwargs())
    report = trainer.replay(HindsightClassifier(), datamodule=DigitsData(), run=run_id, train=False)
    with open(out, "w") as f:
        json.dump(asdict(report), f)
