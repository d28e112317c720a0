"""Real Lightning runs for the mid-epoch restart tests (test_midepoch.py, and the child it SIGKILLs).

``ValueLog`` records every value a run logs (each ``self.log`` call, each epoch aggregate of the
training and validation stages) and the final training state; ``Captures`` takes mid-epoch
captures with flor_lightning._lightning and, under ``fit(ckpt_path=...)``, resumes from one as a
recorder's callback would. Two runs are equal when their records are, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loops.fit_loop import _FitLoop
from models import DigitsClassifier, DigitsData, trainer_kwargs
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler
from torchmetrics import Accuracy

from flor_lightning import _lightning
from flor_lightning import _rng as rng
from flor_lightning._checkpoints import snapshot
from flor_lightning._errors import CheckpointError
from flor_lightning._midepoch import EpochRngTracker, Exactness, Moment

Record = tuple[str, str, int, int, Any]  # (kind, name, epoch, global step, value)


class Interrupted(Exception):
    """Raised by :class:`StopAt`: the run ends there, as if killed."""


class StopAt(L.Callback):
    """Interrupts the run as training batch ``batch_idx`` of ``epoch`` starts."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.at = (epoch, batch_idx)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) == self.at:
            raise Interrupted(f"stopped at epoch {self.at[0]} batch {batch_idx}")


class ValueLog(L.Callback):
    """Every value the run logs outside the sanity check, in order, and its state at the end of training."""

    def __init__(self) -> None:
        self.values: list[Record] = []
        self.final: dict[str, Any] = {}
        self.epochs_ended: list[int] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        original = pl_module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if not trainer.sanity_checking:  # as flor, which records no sanity check
                step = _lightning.step_value(value)
                step = step.clone() if isinstance(step, torch.Tensor) else step
                self.values.append(("step", name, trainer.current_epoch, trainer.global_step, step))
            original(name, value, *args, **kwargs)

        pl_module.log = log  # type: ignore[method-assign]

    def _epoch_values(self, trainer: L.Trainer) -> None:
        for name, value in _lightning.epoch_values(trainer).items():
            self.values.append(("epoch", name, trainer.current_epoch, trainer.global_step, value.clone()))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._epoch_values(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_ended.append(trainer.current_epoch)
        self._epoch_values(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final = snapshot(
            {
                "model": pl_module.state_dict(),
                "optimizers": [opt.state_dict() for opt in trainer.optimizers],
                "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
                "global_step": trainer.global_step,
                "batches_that_stepped": trainer.fit_loop.epoch_loop._batches_that_stepped,  # loggers' step
                "rng": rng.capture(),
            }
        )


def assert_same_values(expected: list[Record], got: list[Record]) -> None:
    """The two runs logged the same names at the same epochs and steps, with bit-identical values."""
    assert [r[:4] for r in got] == [r[:4] for r in expected]
    differ = [r[:4] for r, s in zip(expected, got, strict=True) if not _equal(r[4], s[4])]
    assert not differ, f"{len(differ)} of {len(expected)} values differ, first {differ[:5]}"


def assert_same_state(expected: Any, got: Any, where: str = "final state") -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), where
        for key in expected:
            assert_same_state(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert _equal(expected, got), where


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


@dataclass(frozen=True)
class Saved:
    """A capture written by :class:`Captures`: its file, and how many values the run had logged by then."""

    path: Path
    logged: int
    moment: str
    epoch: int
    batches: int


class Captures(L.Callback):
    """Takes mid-epoch captures as a recorder would, and resumes from one under ``fit(ckpt_path=...)``.

    Captures at every validation point inside an epoch (``at_validation``) and at the
    ``on_train_batch_end`` of the batches numbered (from 1, within the epoch) in ``at_batches``;
    with ``epoch_starts``, also an epoch checkpoint as flor takes it (``dump_state`` as an epoch
    starts). Attach it after the run's :class:`ValueLog`, so that a capture counts the values
    logged before it.
    """

    def __init__(
        self,
        folder: Path,
        values: ValueLog,
        *,
        at_validation: bool = True,
        at_batches: tuple[int, ...] = (),
        epoch_starts: bool = False,
    ) -> None:
        self.folder, self.values = folder, values
        self.at_validation, self.at_batches, self.epoch_starts = at_validation, at_batches, epoch_starts
        self.tracker = EpochRngTracker()
        self.saved: list[Saved] = []
        self.epoch_checkpoints: dict[int, Path] = {}
        self.refused: list[str] = []
        self.result: Exactness | None = None
        self.warnings: list[str] = []  # what the resumed fit warned (filled in by the tests)
        self._rng_at_validation: dict[str, Any] | None = None
        self._loaded: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tracker.fit_started(rng.capture())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = rng.capture()
        self.tracker.epoch_started(trainer.current_epoch, state)
        if self.epoch_starts:
            checkpoint = _lightning.dump_state(trainer)
            checkpoint["flor"] = {"epoch": trainer.current_epoch - 1, "rng": state, "rng_at_validation": None}
            self.epoch_checkpoints[trainer.current_epoch - 1] = self._write(
                checkpoint, f"epoch{trainer.current_epoch - 1}"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.tracker.batch_started(trainer.current_epoch, rng.capture())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._rng_at_validation = rng.capture()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_validation:
            self._capture(trainer, "validation_end")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 in self.at_batches:
            self._capture(trainer, "train_batch_end")

    def _capture(self, trainer: L.Trainer, moment: Moment) -> None:
        refusal = _lightning.mid_epoch_refusal(trainer, moment)
        data_rng = self.tracker.data_rng(trainer.current_epoch)
        if refusal is not None or data_rng is None:
            self.refused.append(refusal or "no data RNG states")
            return
        state = _lightning.capture_mid_epoch(
            trainer, moment, data_rng=data_rng, rng_at_validation=self._rng_at_validation
        )
        mid = state["flor"]["mid_epoch"]
        name = f"e{mid['epoch']}-b{mid['batches']}-{moment}"
        path = self._write(state, name)
        self.saved.append(Saved(path, len(self.values.values), moment, mid["epoch"], mid["batches"]))

    def _write(self, state: dict[str, Any], name: str) -> Path:
        path = self.folder / f"{name}.ckpt"
        tmp = path.with_suffix(".tmp")
        torch.save(snapshot(state), tmp)
        os.replace(tmp, path)  # a reader (or a kill) never sees half a capture
        return path

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._loaded = checkpoint.get("flor")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None or "mid_epoch" not in loaded:
            return
        self.tracker.resumed(loaded["mid_epoch"]["data_rng"])
        self.result = _lightning.resume_mid_epoch(trainer, loaded)
        if not self.result.exact:
            raise CheckpointError(f"this capture cannot be resumed exactly: {self.result.reason}")


class SegmentLoop(_FitLoop):
    """A custom fit loop as a replay uses one: restores a mid-epoch capture as its first epoch starts
    and stops that epoch after ``stop_after`` of its batches (without the epoch's end)."""

    def __init__(self, trainer: L.Trainer, state: dict[str, Any], *, stop_after: int | None = None) -> None:
        original = trainer.fit_loop
        super().__init__(trainer, min_epochs=original.min_epochs, max_epochs=original.max_epochs)
        self.epoch_loop = _lightning.StoppableEpochLoop(
            trainer, min_steps=original.epoch_loop.min_steps, max_steps=original.epoch_loop.max_steps
        )
        self._state: dict[str, Any] | None = state
        self._stop_after = stop_after
        self._stopped = False
        self.result: Exactness | None = None

    @property
    def done(self) -> bool:
        return self._stopped or super().done

    def on_advance_start(self) -> None:
        if self._state is not None:
            state, self._state = self._state, None
            _lightning.restore_modules(self.trainer, state, what="the capture")
            _lightning.restore_loops_mid_epoch(self.trainer, state["loops"]["fit_loop"])
            self.result = _lightning.resume_mid_epoch(self.trainer, state["flor"])
            if not self.result.exact:
                raise CheckpointError(self.result.reason)
            self.epoch_loop.stop_after = self._stop_after
        super().on_advance_start()

    def on_advance_end(self) -> None:
        if self.epoch_loop.stopped_early:
            self._stopped = True
            return
        super().on_advance_end()


# ---- data and models ------------------------------------------------------------------------------


class Data(DigitsData):
    """The digits data with a choice of training loader."""

    def __init__(
        self, *, shuffle: bool = True, num_workers: int = 0, persistent: bool = False, kind: str = "plain"
    ) -> None:
        super().__init__(shuffle=shuffle)
        self.num_workers, self.persistent, self.kind = num_workers, persistent, kind

    def train_dataloader(self) -> DataLoader:
        if self.kind == "iterable":
            return DataLoader(_Stream(self.train_set), batch_size=self.hparams.batch_size)
        if self.kind == "distributed":  # a sampler that shuffles by its set_epoch, as under DDP
            sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True)
            return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler)
        cls = StatefulLoader if self.kind == "stateful" else DataLoader
        return cls(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=self.hparams.shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.persistent,
        )


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """An IterableDataset over a dataset, in a random order (no state_dict)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Any:
        for i in torch.randperm(len(self.dataset)).tolist():
            yield self.dataset[i]


class StatefulLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader with Lightning's stateful interface: it remembers its epoch's sampler seed and how
    many batches it has yielded, and a loaded state makes its next iterator resume there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded, self._seed, self._resume_at = 0, 0, 0

    def __iter__(self) -> Any:
        skip, self._resume_at = self._resume_at, 0
        if not skip:
            self._seed = int(torch.empty((), dtype=torch.int64).random_().item())
        assert isinstance(self.sampler, RandomSampler)
        self.sampler.generator = torch.Generator().manual_seed(self._seed)
        self._yielded = skip
        batches = super().__iter__()
        for _ in range(skip):  # at once, as torchdata's StatefulDataLoader restores its position in iter()
            next(batches)
        return self._counted(batches)

    def _counted(self, batches: Any) -> Any:
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self._yielded, "seed": self._seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._seed, self._resume_at = state["seed"], state["yielded"]


class AccuracyClassifier(DigitsClassifier):
    """Logs torchmetrics Accuracy objects: training (step and epoch) and validation (epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_accuracy = Accuracy(task="multiclass", num_classes=10)
        self.val_accuracy = Accuracy(task="multiclass", num_classes=10)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.train_accuracy(logits, y)
        self.log("train_accuracy", self.train_accuracy, on_step=True, on_epoch=True)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy.update(self(x), y)
        self.log("val_accuracy", self.val_accuracy, on_epoch=True)


class PlateauClassifier(DigitsClassifier):
    """Halves its learning rate when val_loss does not improve, checked as each epoch ends."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_loss", "interval": "epoch"}}


GROUP = object()  # stands for a process group: an object a checkpoint cannot hold


class GroupSyncedClassifier(DigitsClassifier):
    """Logs train_loss with a sync_dist_group, whose epoch aggregate a capture therefore cannot hold."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist_group=GROUP)
        return loss


class NoisyEpochStart(DigitsClassifier):
    """Draws a random number in its own on_train_epoch_start, between a recorder's epoch start and the data."""

    def on_train_epoch_start(self) -> None:
        self.noise = torch.rand(1)


def run(
    callbacks: list[L.Callback],
    *,
    ckpt_path: Path | None = None,
    data: Callable[[], L.LightningDataModule] = Data,
    model: Callable[[], L.LightningModule] = DigitsClassifier,
    fit_loop: Callable[[L.Trainer], _FitLoop] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """One fit on the digits, seeded as a script is (a resumed run is seeded the same way), with
    ``models.trainer_kwargs`` updated by ``overrides``."""
    L.seed_everything(0, workers=True)
    module, datamodule = model(), data()
    trainer = L.Trainer(**trainer_kwargs(callbacks=callbacks, **overrides))
    if fit_loop is not None:
        trainer.fit_loop = fit_loop(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
