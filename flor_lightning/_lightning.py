"""The one module that touches private Lightning internals.

Everything here is pinned to the Lightning range in ``pyproject.toml`` and covered by the
integration tests; the rest of the package uses public Lightning API only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.progress import _ProcessedTracker
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric
from typing_extensions import override

from flor_lightning import rng
from flor_lightning.errors import CheckpointError
from flor_lightning.planner import EpochStep

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor

# Keys Lightning adds to a checkpoint that hold arbitrary user objects; flor keeps hyper-
# parameters in its log store instead, so a checkpoint stays loadable with weights_only=True.
_USER_OBJECT_KEYS = (
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hparams_type",
)


def dump_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Lightning's full training state (model, optimizers, schedulers, precision/AMP scaler,
    loops, callbacks, datamodule), as references to the live objects."""
    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for key in _USER_OBJECT_KEYS:
        state.pop(key, None)
    _as_between_epochs(state["loops"]["fit_loop"])
    return state


def _as_between_epochs(fit: dict[str, Any]) -> None:
    """Make the epoch loop's progress read as between two epochs, as flor's checkpoints are.

    Taken as an epoch starts (or as training ends), the epoch loop still holds the last epoch's
    batch counts; Lightning's resume would read them as "that epoch's batches are done" and skip
    the next epoch's training. Its state after ``reset()`` for a new epoch is what resume needs.
    """

    def zero(counts: dict[str, int]) -> dict[str, int]:
        return dict.fromkeys(counts, 0)

    batches = fit["epoch_loop.batch_progress"]
    batches["current"], batches["is_last_batch"] = zero(batches["current"]), False
    schedulers = fit["epoch_loop.scheduler_progress"]
    schedulers["current"] = zero(schedulers["current"])
    for progress in fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"].values():
        progress["current"] = zero(progress["current"])
    manual = fit["epoch_loop.manual_optimization.optim_step_progress"]
    manual["current"] = zero(manual["current"])
    val = fit["epoch_loop.val_loop.batch_progress"]
    val["total"] = zero(val["total"])


def step_value(value: Any) -> Any:
    """What Lightning logs for one ``self.log`` call at this step: a detached tensor, the value of a
    torchmetrics ``Metric`` at this step (its forward cache, as Lightning reads it), or the value
    as given; None for a Metric that was not called this step."""
    if isinstance(value, Metric):
        value = value._forward_cache
    return value.detach() if isinstance(value, torch.Tensor) else value


def epoch_values(trainer: pl.Trainer) -> dict[str, Tensor]:
    """The epoch-level aggregates of the values logged in the current stage so far.

    Names follow Lightning's loggers: ``name_epoch`` where the value was also logged per step,
    with a ``/dataloader_idx_N`` suffix for multiple evaluation dataloaders.
    """
    results = trainer._results
    if results is None:
        return {}
    out: dict[str, Tensor] = {}
    for metric in list(results.values()):
        if metric.has_reset or not metric.meta.on_epoch:
            continue
        value = _ResultCollection._get_cache(metric, on_step=False)
        if value is not None:
            _, name = results._forked_name(metric, on_step=False)
            out[name] = value
    return out


class ReplayHooks(Protocol):
    """What the replay loop asks of the replay it runs (see ``flor_lightning.replay``)."""

    def steps(self, trainer: pl.Trainer) -> list[EpochStep]:
        """The steps this process runs (chosen by rank once the processes are up)."""

    def load(self, epoch: int) -> dict[str, Any]:
        """The verified checkpoint of ``epoch``; raises CheckpointError with ``.epoch`` set."""

    def replan(self, bad_epoch: int, remaining: list[EpochStep]) -> list[EpochStep]:
        """New steps for ``remaining`` without checkpoint ``bad_epoch``."""

    def on_start(self, trainer: pl.Trainer) -> None:
        """Called once data is set up, before the first step."""

    def on_step_start(self, trainer: pl.Trainer, step: EpochStep) -> None:
        """Called before each step."""

    def on_step_done(self, trainer: pl.Trainer, step: EpochStep) -> None:
        """Called after each step."""


class ReplayFitLoop(_FitLoop):
    """A fit loop that walks a replay plan instead of ``range(max_epochs)``.

    For a ``restore`` step it loads the epoch's checkpoint, runs validation (with the RNG
    state the recording had when its validation started) and the epoch-end hooks, and skips
    the training batches; for a ``train`` step it loads the checkpoint before the epoch (when
    the plan says so) and runs the epoch as Lightning would. Epoch and step counters come from
    the checkpoints, so every value logged carries the recorded run's epoch and global step.
    A checkpoint that fails to load is reported to ``hooks.replan`` and the rest of the plan
    replaced, so the replay goes on from an earlier checkpoint.

    Under a multi-process strategy every rank runs its own steps as an independent process:
    see :func:`isolate_rank`.
    """

    def __init__(self, trainer: pl.Trainer, hooks: ReplayHooks) -> None:
        original = trainer.fit_loop
        super().__init__(trainer, min_epochs=original.min_epochs, max_epochs=original.max_epochs)
        self.epoch_loop = _TrainingEpochLoop(
            trainer, min_steps=original.epoch_loop.min_steps, max_steps=original.epoch_loop.max_steps
        )
        self._hooks = hooks
        self._steps: list[EpochStep] | None = None
        self._next = 0
        self._end_rng: dict[str, Any] | None = None
        self._validation_rng: dict[str, Any] | None = None

    @property
    def _step(self) -> EpochStep:
        assert self._steps is not None
        return self._steps[self._next]

    @property
    def done(self) -> bool:
        return self._steps is not None and self._next >= len(self._steps)

    @override
    def on_run_start(self) -> None:
        isolate_rank(self.trainer)
        self._steps = self._hooks.steps(self.trainer)
        self._hooks.on_start(self.trainer)
        super().on_run_start()

    @override
    def on_advance_start(self) -> None:
        while True:
            step = self._step
            try:
                if step.load is not None:
                    self._restore(step.load, step)
                break
            except CheckpointError as err:
                bad = getattr(err, "epoch", None)
                if bad is None:
                    raise
                assert self._steps is not None
                self._steps[self._next :] = self._hooks.replan(bad, self._steps[self._next :])
        self._hooks.on_step_start(self.trainer, step)
        if step.action == "train":
            super().on_advance_start()
            return
        self.setup_data()
        bar = self.trainer.progress_bar_callback
        if bar is not None:
            bar.on_train_epoch_start(self.trainer, self.trainer.lightning_module)

    @override
    def advance(self) -> None:
        if self._step.action == "train":
            super().advance()
            return
        trainer = self.trainer
        if self._validation_rng is not None:
            rng.restore(self._validation_rng)
        if self._validates_this_epoch():
            trainer.validating = True
            first_loop_iter = trainer._logger_connector._first_loop_iter
            # The recording validated inside its last batch, before Lightning counted that batch as
            # stepped: its loggers got validation on one step less than the restored counter says.
            self.epoch_loop._batches_that_stepped -= 1
            try:
                self.epoch_loop.val_loop.run()
            finally:
                self.epoch_loop._batches_that_stepped += 1
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter
        if self._end_rng is not None:
            rng.restore(self._end_rng)

    @override
    def on_advance_end(self) -> None:
        step = self._step
        if step.action == "train":
            super().on_advance_end()
        else:
            self._restored_epoch_end()
        self._next += 1
        self._hooks.on_step_done(self.trainer, step)

    def _restored_epoch_end(self) -> None:
        """Lightning's ``_FitLoop.on_advance_end`` without the scheduler step: the restored state already has it.

        Kept in step with Lightning's method by ``tests/test_lightning_fence.py``.
        """
        trainer = self.trainer
        trainer._logger_connector.epoch_end_reached()
        self.epoch_progress.increment_processed()
        call._call_callback_hooks(trainer, "on_train_epoch_end", monitoring_callbacks=False)
        call._call_lightning_module_hook(trainer, "on_train_epoch_end")
        call._call_callback_hooks(trainer, "on_train_epoch_end", monitoring_callbacks=True)
        trainer._logger_connector.on_epoch_end()
        self.epoch_loop._batches_that_stepped -= 1
        trainer._logger_connector.update_train_epoch_metrics()
        self.epoch_loop._batches_that_stepped += 1
        self.epoch_progress.increment_completed()
        if trainer.received_sigterm:  # as Lightning's epoch end: a SIGTERM stops the replay between epochs
            raise SIGTERMException

    def _validates_this_epoch(self) -> bool:
        trainer = self.trainer
        every = trainer.check_val_every_n_epoch
        return bool(trainer.enable_validation) and (every is None or (trainer.current_epoch + 1) % every == 0)

    def _restore(self, epoch: int, step: EpochStep) -> None:
        """Load checkpoint ``epoch`` into the model, optimizers, schedulers, callbacks and counters."""
        trainer = self.trainer
        state = self._hooks.load(epoch)
        connector = trainer._checkpoint_connector
        connector._loaded_checkpoint = state
        try:
            connector.restore_datamodule()
            connector.restore_model()
            connector.restore_callbacks()
            connector.restore_precision_plugin_state()
            connector.restore_optimizers_and_schedulers()
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(
                f"the checkpoint of epoch {epoch} does not fit the model or optimizers being replayed: {err}. "
                "Replay with the model, optimizers and hyperparameters the run was recorded with "
                "(flor.runs() shows its hparams; the shadow commit holds its code)."
            ) from err
        finally:
            connector._loaded_checkpoint = {}
        self.load_state_dict(state["loops"]["fit_loop"])
        self._clear_restart_flags(self)
        flor = state.get("flor", {})
        self._end_rng = flor.get("rng")
        self._validation_rng = flor.get("rng_at_validation")
        if self._end_rng is not None:
            rng.restore(self._end_rng)
        progress = self.epoch_progress
        if step.action == "restore":
            # the checkpoint was taken as epoch `epoch + 1` began; step back into epoch `epoch`,
            # its training batches done
            for p in (progress.current, progress.total):
                assert isinstance(p, _ProcessedTracker)
                p.ready = p.started = epoch + 1
                p.processed = p.completed = epoch
        else:
            for p in (progress.current, progress.total):
                assert isinstance(p, _ProcessedTracker)
                p.ready = p.started = p.processed = p.completed = epoch + 1

    @staticmethod
    def _clear_restart_flags(loop: _Loop) -> None:
        loop.restarting = False
        for child in [loop, *(v for v in vars(loop).values() if isinstance(v, _Loop))]:
            child._loaded_from_state_dict = False
            child._resuming_from_checkpoint = False
            if child is not loop:
                ReplayFitLoop._clear_restart_flags(child)


_KEEP_ALIVE: list[object] = []


def isolate_rank(trainer: pl.Trainer) -> None:
    """Make this rank replay as an independent process.

    Under DDP, replay must not average gradients across ranks (each rank follows its own
    recorded trajectory), broadcast rank 0's buffers (BatchNorm), sync logged values
    (``sync_dist`` would mix epoch 0 of one rank with epoch 5 of another) or wait in a
    collective (ranks run different numbers of batches). So the model is unwrapped from
    DistributedDataParallel and the process group, needed only to start the ranks, is
    destroyed: every later barrier, reduce and metric sync is then a no-op.
    """
    strategy = trainer.strategy
    model = strategy.model
    if isinstance(model, DistributedDataParallel):
        strategy.model = model.module
        # Keep the wrapper alive: freeing its reducer destroys the gloo group, which joins gloo's
        # worker thread while holding the GIL that thread may need (a deadlock seen ~1 in 10 runs).
        _KEEP_ALIVE.append(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank is past its last collective before any leaves the group
        torch.distributed.destroy_process_group()


def replay_data_unsharded(trainer: pl.Trainer, enabled: bool) -> bool:
    """Turn Lightning's automatic distributed sampler off (``enabled=False``); returns the old setting.

    Each replaying rank must see all of its data, as the single-device recording did.
    """
    connector = trainer._accelerator_connector
    old = bool(connector.use_distributed_sampler)
    connector.use_distributed_sampler = enabled
    return old


def spawns_ranks(trainer: pl.Trainer) -> bool:
    """Whether the strategy starts its ranks by spawning (ddp_spawn), which pickles the Trainer."""
    launcher = trainer.strategy.launcher
    return isinstance(launcher, _MultiProcessingLauncher) and not forks_ranks(trainer)


def forks_ranks(trainer: pl.Trainer) -> bool:
    """Whether fit forks the ranks from this process (ddp_fork) and runs none itself."""
    launcher = trainer.strategy.launcher
    return isinstance(launcher, _MultiProcessingLauncher) and launcher._start_method == "fork"


def logger_prefix(logger: object) -> str:
    """The ``prefix`` a TensorBoard, CSV or MLflow logger puts before each name (kept privately)."""
    return str(getattr(logger, "_prefix", "") or "")
