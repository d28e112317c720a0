"""Seeing every ``self.log`` call: the hot path of recording.

``LogCapture`` wraps ``log`` on one LightningModule instance (not on the class, and only while
a Trainer runs), so it sees every call whatever ``log_every_n_steps`` or ``logger=False`` say,
and values that callbacks log through ``pl_module.log`` too. Inside a batch a call costs two
list appends (the name and the value; a tensor is detached only when it requires grad): the
batch's context (run, stage, epoch, step, batch index) is built once, when the batch starts,
and the batch's values go to the writer as one item when the batch is over. No object is made
per value, so the hot path adds nothing for the garbage collector to track.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from flor_lightning import _lightning

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from flor_lightning._store import LogWriter

# Lightning's running stages that are recorded (the sanity check and predict are not), named as Lightning does.
RECORDED_STAGES = frozenset({"train", "validate", "test"})


class LogCapture:
    """Turns ``self.log`` calls into log rows for a :class:`~flor_lightning._store.LogWriter`.

    Attributes:
        muted: drop what is logged (replay sets it while it trains an epoch another segment stores).
        steps: keep only what is logged at these global steps (None: every step); replay sets it for a
            slice of an epoch (``replay(steps=...)``).
        partial: names of epoch aggregates left out because they covered only part of their epoch (a
            replay continued it from a checkpoint inside it that held none of theirs).
    """

    def __init__(self) -> None:
        self.muted = False
        self.steps: range | None = None
        self.partial: set[str] = set()  # epoch aggregates left out: they covered part of their epoch only
        self._writer: LogWriter | None = None
        self._ids: tuple[str, str | None] = ("", None)
        self._context: tuple[Any, ...] = ()
        self._values: list[Any] | None = None  # name, value, name, value, ... of the batch in progress
        self._owner: pl.LightningModule | None = None
        self._epoch_level: set[str] = set()

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.log`` on the instance (idempotent)."""
        if self._owner is pl_module:
            return
        self.detach()
        original = pl_module.log
        capture = self

        def log_and_record(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            original(name, value, *args, **kwargs)
            values = capture._values
            if values is not None:  # inside a batch: the hot path
                if isinstance(value, Tensor):
                    if value.requires_grad:  # else detach() would only cost a new tensor object
                        value = value.detach()
                elif not isinstance(value, (int, float)):
                    value = _lightning.step_value(value)
                    if value is None:
                        return
                values.append(name)
                values.append(value)
            else:
                capture._outside_batch(pl_module, name, value)

        pl_module.__dict__["log"] = log_and_record
        self._owner = pl_module

    def detach(self) -> None:
        """Put the module's own ``log`` back."""
        if self._owner is not None:
            self._owner.__dict__.pop("log", None)
            self._owner = None

    def start(self, writer: LogWriter, run_id: str, replay_id: str | None) -> None:
        """Send rows to ``writer`` as values of ``run_id`` (and ``replay_id`` when replaying)."""
        self._writer, self._ids = writer, (run_id, replay_id)

    def stop(self) -> None:
        self._queue_batch()
        self._writer = None

    def batch_started(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """Fix the context of the values the coming batch logs (the step the batch belongs to)."""
        self._queue_batch()
        stage = _stage(trainer)
        self._epoch_level.clear()
        if self._writer is None or self._drops(trainer) or stage is None:
            return
        self._context = (*self._ids, stage, "step", trainer.current_epoch, trainer.global_step, batch_idx)
        self._values = []

    def batches_ended(self) -> None:
        """An epoch-level phase begins: what is logged now is its own epoch aggregate."""
        self._queue_batch()

    def _drops(self, trainer: pl.Trainer) -> bool:
        """Whether what is logged now is dropped (:attr:`muted`, or a global step outside :attr:`steps`)."""
        return self.muted or (self.steps is not None and trainer.global_step not in self.steps)

    def _queue_batch(self) -> None:
        """Hand the values of the batch that just ended to the writer."""
        values, self._values = self._values, None
        if values and self._writer is not None:
            self._writer.add_batch(self._context, values)

    def _outside_batch(self, pl_module: pl.LightningModule, name: str, value: Any) -> None:
        trainer = pl_module.trainer
        stage = _stage(trainer)
        if self._writer is None or self._drops(trainer) or stage is None:
            return
        value = _lightning.step_value(value)
        if value is None:
            return
        self._epoch_level.add(name)
        self._writer.add((*self._ids, stage, "epoch", trainer.current_epoch, trainer.global_step, None, name, value))

    def epoch_ended(self, trainer: pl.Trainer, stage: str) -> None:
        """Store Lightning's epoch aggregates of what the batches logged, and flush."""
        self._queue_batch()
        if self._writer is None or self._drops(trainer) or trainer.sanity_checking:
            return
        for name, value in _lightning.epoch_values(trainer, partial=self.partial).items():
            if name not in self._epoch_level:  # else logged from an epoch-end hook, stored as logged
                self._writer.add(
                    (*self._ids, stage, "epoch", trainer.current_epoch, trainer.global_step, None, name, value)
                )
        self._epoch_level.clear()
        self._writer.flush(wait=False)


def _stage(trainer: pl.Trainer) -> str | None:
    stage = trainer.state.stage
    return stage.value if stage is not None and stage.value in RECORDED_STAGES else None
