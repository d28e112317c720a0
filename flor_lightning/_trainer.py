"""flor.Trainer: a drop-in lightning Trainer that records with FlorCallback and can replay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from flor_lightning._callback import FlorCallback
from flor_lightning._errors import ConfigError
from flor_lightning._replay import run_replay
from flor_lightning._report import ReplayReport
from flor_lightning._segments import flor_callback


class Trainer(pl.Trainer):
    """A :class:`lightning.pytorch.Trainer` with :class:`FlorCallback` attached.

    Takes exactly Lightning's arguments; a ``FlorCallback`` given in ``callbacks`` is used
    as it is (to set its options), otherwise a default one is added.

    Example:
        >>> import flor_lightning as flor
        >>> trainer = flor.Trainer(max_epochs=10)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        attached = sum(isinstance(cb, FlorCallback) for cb in callbacks)
        if attached > 1:
            raise ConfigError(
                f"{attached} FlorCallback instances were given; flor.Trainer records with exactly one "
                "(pass one FlorCallback to set its options, or none for the defaults)"
            )
        if not attached:
            callbacks.append(FlorCallback())
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)

    @property
    def flor(self) -> FlorCallback:
        """The attached FlorCallback."""
        return flor_callback(self)

    def replay(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        *,
        run: str | None = None,
        epochs: Sequence[int] | range | None = None,
        steps: range | None = None,
        segments: int = 1,
        segment: int | None = None,
        train: bool | None = None,
        loggers: bool = True,
    ) -> ReplayReport:
        """Replay a recorded run with the current code, storing what it logs beside the recording.

        Each epoch is restored from its checkpoint and validated (with the epoch-end hooks),
        or, when new logging sits on the training path, re-trained from the checkpoint before
        it. Values carry the recorded run's epoch and global step. Recorded values that are
        logged again are compared bit for bit; the returned report says how many matched.

        The data arguments are those of ``fit``, in its order: ``replay(model, train_loader, val_loader)``,
        ``replay(model, datamodule=dm)`` and ``replay(model, dm)`` work as they do for ``fit``.

        Args:
            model: the LightningModule, built as for the recording (same hyperparameters).
            train_dataloaders: training dataloaders (or a datamodule), as for ``fit``.
            val_dataloaders: validation dataloaders, as for ``fit``.
            datamodule: the datamodule, as for ``fit``.
            run: the run id (default: the latest recorded run of this script).
            epochs: the recorded epochs to replay (default: all).
            steps: instead of ``epochs``, a slice of global (optimizer) steps to replay, e.g.
                ``range(1000, 2000)`` of a long epoch: only values logged at those steps are stored;
                re-training starts from the latest checkpoint inside the epoch before the slice (when a
                restart from it is exact, else from the epoch's start) and stops after the slice.
            segments: split the epochs into this many contiguous segments, balanced by the
                recorded epoch times; in one process they run one after another. Under
                ``strategy="ddp"`` or ``"ddp_fork"`` it must equal the world size, and rank r
                replays segment r (``ddp_fork`` starts the ranks in a fraction of a second
                on CPUs; ``ddp`` runs the script again per rank).
            segment: replay only this segment (0-based), e.g. one SLURM array task each.
            train: re-run training batches (True), restore only (False), or decide by comparing
                the training-path code with the recorded version (None).
            loggers: write the new values into the runs the recording's loggers wrote (True), or
                send nothing to any logger during the replay (False). With True the Trainer's own
                loggers are set aside for the replay (no new ``lightning_logs/version_N``), and
                the recorded TensorBoard run gets a new event file in its folder, the recorded
                MLflow run the values on its run id (tagged ``flor.replay_id``), the recorded
                CSVLogger run a ``metrics.flor-<replay_id>.csv`` beside its ``metrics.csv``:
                only names the recording lacks, on the recorded steps. Other loggers (W&B: its
                steps must increase) get nothing, with a note; ``flor export`` is the way there.

        Returns:
            The replay report (also printed and stored with the replay).

        Raises:
            ReplayError: no recorded run, unknown run id, epochs outside the recording, bad
                segment arguments.
            CheckpointError: the model no longer fits the recorded checkpoints.

        Example:
            >>> trainer = flor.Trainer(max_epochs=10)  # doctest: +SKIP
            >>> trainer.replay(model, datamodule=dm, epochs=range(3, 7))  # doctest: +SKIP
        """
        if isinstance(train_dataloaders, pl.LightningDataModule):  # replay(model, dm), as fit(model, dm)
            datamodule, train_dataloaders = train_dataloaders, None
        return run_replay(
            self,
            model,
            datamodule=datamodule,
            train_dataloaders=train_dataloaders,
            val_dataloaders=val_dataloaders,
            run=run,
            epochs=epochs,
            steps=steps,
            segments=segments,
            segment=segment,
            train=train,
            loggers=loggers,
        )
