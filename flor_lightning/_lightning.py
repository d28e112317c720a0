"""The one module that touches private Lightning internals.

Everything here is pinned to the Lightning range in ``pyproject.toml`` and covered by the
integration tests; the rest of the package uses public Lightning API only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.progress import _ProcessedTracker
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.connectors.logger_connector.result import (
    _Metadata,
    _ResultCollection,
    _ResultMetric,
    _Sync,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.combined_loader import _ModeIterator
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _SingleProcessDataLoaderIter
from torchmetrics import Metric
from typing_extensions import override

from flor_lightning import _rng as rng
from flor_lightning._errors import CheckpointError
from flor_lightning._midepoch import Exactness, LoaderFacts, Moment, SkipHow, capture_refusal, data_skip, not_exact
from flor_lightning._planner import EpochStep

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
    loops, callbacks, datamodule) between two epochs, as references to the live objects."""
    state = _full_state(trainer)
    _as_between_epochs(state["loops"]["fit_loop"])
    return state


def _full_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Lightning's full training state as its own checkpoint holds it, less the user objects."""
    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for key in _USER_OBJECT_KEYS:
        state.pop(key, None)
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


class ManifestCheckpointIO(CheckpointIO):
    """The strategy's checkpoint IO, reading flor's manifests too: ``fit(ckpt_path=flor.last_checkpoint(run))``
    restores from one (verified, blobs mmap-ed); every other path and every save go to the IO it wraps."""

    def __init__(self, inner: CheckpointIO, load: Callable[[str], dict[str, Any]], suffix: str) -> None:
        self.inner, self._load, self._suffix = inner, load, suffix

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if str(path).endswith(self._suffix):
            return self._load(str(path))
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def read_manifests(trainer: pl.Trainer, load: Callable[[str], dict[str, Any]], suffix: str) -> None:
    """Let ``trainer.fit(ckpt_path=...)`` restore from a flor manifest (a path ending in ``suffix``)."""
    io = trainer.strategy.checkpoint_io
    if not isinstance(io, ManifestCheckpointIO):
        trainer.strategy.checkpoint_io = ManifestCheckpointIO(io, load, suffix)


def step_value(value: Any) -> Any:
    """What Lightning logs for one ``self.log`` call at this step: a detached tensor, the value of a
    torchmetrics ``Metric`` at this step (its forward cache, as Lightning reads it), or the value
    as given; None for a Metric that was not called this step."""
    if isinstance(value, Metric):
        value = value._forward_cache
    return value.detach() if isinstance(value, torch.Tensor) else value


def epoch_values(trainer: pl.Trainer, *, partial: set[str] | None = None) -> dict[str, Tensor]:
    """The epoch-level aggregates of the values logged in the current stage so far.

    Names follow Lightning's loggers: ``name_epoch`` where the value was also logged per step,
    with a ``/dataloader_idx_N`` suffix for multiple evaluation dataloaders. With ``partial`` given,
    the training aggregates that cover only part of the epoch (a replay continued it from a checkpoint
    inside it, which held no aggregate of theirs: :attr:`StoppableEpochLoop.complete`) are left out and
    their names added to ``partial``.
    """
    results = trainer._results
    if results is None:
        return {}
    loop = trainer.fit_loop.epoch_loop
    complete = loop.complete if isinstance(loop, StoppableEpochLoop) and results is loop._results else None
    out: dict[str, Tensor] = {}
    for key, metric in list(results.items()):
        if metric.has_reset or not metric.meta.on_epoch:
            continue
        if partial is not None and complete is not None and key not in complete:
            partial.add(results._forked_name(metric, on_step=False)[1])
            continue
        value = _ResultCollection._get_cache(metric, on_step=False)
        if value is not None:
            _, name = results._forked_name(metric, on_step=False)
            out[name] = value
    return out


class ReplayHooks(Protocol):
    """What the replay loop asks of the replay it runs (``flor_lightning._segments.SegmentRunner``)."""

    def steps(self, trainer: pl.Trainer) -> list[EpochStep]:
        """The steps this process runs (chosen by rank once the processes are up)."""

    def load(self, epoch: int) -> dict[str, Any]:
        """The verified checkpoint of ``epoch``; raises CheckpointError with ``.epoch`` set."""

    def load_inside(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        """The verified checkpoint inside ``epoch`` after its training batch ``batch_idx``; raises CheckpointError."""

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
        self.epoch_loop = StoppableEpochLoop(
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
                elif step.start_inside is not None:
                    self._resume_inside(step.epoch, step.start_inside)
                break
            except CheckpointError as err:
                bad = getattr(err, "epoch", None)
                if bad is None:
                    raise
                assert self._steps is not None
                self._steps[self._next :] = self._hooks.replan(bad, self._steps[self._next :])
        self._hooks.on_step_start(self.trainer, step)
        if step.action == "train":
            self.epoch_loop.stop_after = step.stop_after
            super().on_advance_start()
            return
        self.setup_data()
        bar = self.trainer.progress_bar_callback
        if bar is not None:
            bar.on_train_epoch_start(self.trainer, self.trainer.lightning_module)

    @override
    def advance(self) -> None:
        if self._step.action == "train":
            with warnings.catch_warnings():
                if self._step.start_inside is not None:  # resume_mid_epoch put the data back: exact
                    warnings.filterwarnings("ignore", NOT_RESUMABLE_WARNING)
                super().advance()
            return
        step = self._step
        for batch_idx in step.inside:  # the validation points inside the epoch, each from its checkpoint
            self._validate_inside(step.epoch, batch_idx)
        if not step.end:  # a segment of the epoch: its end belongs to a later one
            return
        if step.inside:
            assert step.load is not None
            self._restore(step.load, step)  # back to the epoch's end
        if self._validation_rng is not None:
            rng.restore(self._validation_rng)
        if self._validates_this_epoch() if step.validate_end is None else step.validate_end:
            # The recording validated inside its last batch, before Lightning counted that batch as
            # stepped: its loggers got validation on one step less than the restored counter says.
            self._validate(stepped=-1)
        if self._end_rng is not None:
            rng.restore(self._end_rng)

    def _validate(self, *, stepped: int) -> None:
        """Run validation as the recording did, the loggers' step counter moved by ``stepped`` meanwhile."""
        trainer = self.trainer
        trainer.validating = True
        first_loop_iter = trainer._logger_connector._first_loop_iter
        self.epoch_loop._batches_that_stepped += stepped
        try:
            self.epoch_loop.val_loop.run()
        finally:
            self.epoch_loop._batches_that_stepped -= stepped
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter

    def _validate_inside(self, epoch: int, batch_idx: int) -> None:
        """Load the checkpoint taken as the validation after batch ``batch_idx`` of ``epoch`` ended, and
        validate from the state (and random state) that validation began with."""
        state = self._hooks.load_inside(epoch, batch_idx)
        restore_modules(self.trainer, state, what=f"the checkpoint of epoch {epoch} after batch {batch_idx}")
        self.load_state_dict(state["loops"]["fit_loop"])  # counters inside the epoch, as that validation had them
        self._clear_restart_flags(self)
        rng.restore(state["flor"]["rng_at_validation"])
        self._validate(stepped=0)  # taken before Lightning counted the batch as stepped

    def _resume_inside(self, epoch: int, batch_idx: int) -> None:
        """Load the checkpoint inside ``epoch`` after its batch ``batch_idx`` and continue the epoch from there,
        data position, aggregates, pending gradients and RNGs as recorded (:func:`resume_mid_epoch`).

        Raises:
            CheckpointError: the restart would not be exact (the planner leaves such checkpoints out).
        """
        trainer = self.trainer
        state = self._hooks.load_inside(epoch, batch_idx)
        restore_modules(trainer, state, what=f"the checkpoint of epoch {epoch} after batch {batch_idx}")
        restore_loops_mid_epoch(trainer, state["loops"]["fit_loop"])
        result = resume_mid_epoch(trainer, state["flor"])
        if not result.exact:
            raise CheckpointError(
                f"the checkpoint of epoch {epoch} after batch {batch_idx} cannot be continued exactly: {result.reason}"
            )
        # an aggregate the checkpoint does not hold (new logging) would cover only the batches from here on
        self.epoch_loop.complete = set() if result.aggregates else set(self.epoch_loop._results.keys())

    @override
    def on_advance_end(self) -> None:
        step = self._step
        if step.action == "train" and self.epoch_loop.stopped_early:
            pass  # the rest of the epoch belongs to a later step or segment
        elif step.action == "train":
            super().on_advance_end()
        elif step.end:
            self._restored_epoch_end()
        self.epoch_loop.stop_after, self.epoch_loop.complete = None, None
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
        restore_modules(trainer, state, what=f"the checkpoint of epoch {epoch}")
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


def restore_modules(trainer: pl.Trainer, state: dict[str, Any], *, what: str) -> None:
    """Load ``state`` (``what`` names it in errors) into the datamodule, model, callbacks, precision
    plugin, optimizers and schedulers; the loops are left to the caller."""
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
            f"{what} does not fit the model or optimizers being replayed: {err}. "
            "Replay with the model, optimizers and hyperparameters the run was recorded with "
            "(flor.runs() shows its hparams; the shadow commit holds its code)."
        ) from err
    finally:
        connector._loaded_checkpoint = {}


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


# ---- restarting inside an epoch -------------------------------------------------------------
# Pure decisions are in flor_lightning._midepoch; what follows reads and writes Lightning's loops.

# What Lightning warns on every resume inside an epoch whose training loaders are not stateful, even when
# resume_mid_epoch made it exact (it cannot tell); a caller that knows better may filter it with this pattern.
NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"

# The reductions Lightning 2.6 accepts for self.log (it refuses any other), by a name a checkpoint can hold.
_REDUCTIONS: dict[str, Any] = {
    "mean": torch.mean,
    "max": torch.max,
    "min": torch.min,
    "sum": torch.sum,
    "builtins.max": max,
    "builtins.min": min,
    "builtins.sum": sum,
}


def mid_epoch_refusal(trainer: pl.Trainer, moment: Moment) -> str | None:
    """Why :func:`capture_mid_epoch` cannot capture now, or None when it can."""
    if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
        return "only validation inside fit is a validation point (not the sanity check, not validate())"
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    follows = moment == "train_batch_end" and fetcher is not None and loop._should_check_val_fx(fetcher)
    done = loop._is_training_done or trainer.should_stop
    return capture_refusal(moment, training_done=done, validation_follows=follows)


def capture_mid_epoch(
    trainer: pl.Trainer,
    moment: Moment,
    *,
    data_rng: dict[str, Any],
    rng_at_validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full state inside an epoch, at ``moment``, as a checkpoint ``Trainer.fit(ckpt_path=...)`` loads.

    Lightning's own checkpoint (loop progress as it stands: Lightning's restart logic reads it)
    plus, under ``"flor"``: ``"rng"`` (every generator now), ``"rng_at_validation"`` (as given)
    and ``"mid_epoch"``: where the capture stands (moment, epoch, batches done, global step, the
    epoch's batch count), ``data_rng`` (from :class:`~flor_lightning._midepoch.EpochRngTracker`),
    ``data_skip`` (how a restart will restore the data position with these loaders, or why it
    cannot: known before a replay starts), the training epoch aggregates, the module's
    torchmetrics states, Lightning's metric dicts and gradients still being accumulated. Values
    are references to live objects: copy them (``checkpoints.snapshot``) before training goes on.
    Plain data: ``torch.load(weights_only=True)`` reads it back.

    Raises:
        CheckpointError: :func:`mid_epoch_refusal` says no, or ``data_rng`` is not this epoch's.
    """
    refusal = mid_epoch_refusal(trainer, moment)
    if refusal is not None:
        raise CheckpointError(f"no mid-epoch capture at {moment}: {refusal}")
    if data_rng.get("epoch") != trainer.current_epoch or data_rng.get("first_batch") is None:
        raise CheckpointError(
            f"no mid-epoch capture in epoch {trainer.current_epoch}: the data RNG states given are those of epoch "
            f"{data_rng.get('epoch')}; feed EpochRngTracker from on_fit_start, on_train_epoch_start and "
            "on_train_batch_start"
        )
    loop = trainer.fit_loop.epoch_loop
    done = loop.batch_progress.current
    assert isinstance(done, _ProcessedTracker)
    state = _full_state(trainer)
    state["flor"] = {
        "rng": rng.capture(),
        "rng_at_validation": rng_at_validation,
        "mid_epoch": {
            "moment": moment,
            "epoch": trainer.current_epoch,
            "batches": done.processed,
            "global_step": trainer.global_step,
            "num_training_batches": trainer.num_training_batches,
            "data_rng": data_rng,
            "data_skip": _data_skip(trainer),
            "results": _results_state(loop._results),
            "metrics": _metric_states(trainer.lightning_module, reset=_reset_after(trainer, moment)),
            "logger": _logger_state(trainer),
            "grads": _pending_grads(trainer),
        },
    }
    return state


def restore_loops_mid_epoch(trainer: pl.Trainer, fit_loop_state: dict[str, Any]) -> None:
    """For a custom fit loop: load a mid-epoch capture's ``state["loops"]["fit_loop"]`` so that the
    loops continue inside the epoch, as ``fit(ckpt_path=...)`` would (no epoch-start hooks, the epoch
    loop resuming after the captured batch). Call :func:`resume_mid_epoch` next."""
    fit_loop = trainer.fit_loop
    fit_loop.load_state_dict(fit_loop_state)
    fit_loop.update_restart_stage()


def resume_mid_epoch(trainer: pl.Trainer, flor_state: dict[str, Any]) -> Exactness:
    """Continue the recorded trajectory from a mid-epoch capture (its ``state["flor"]``).

    Called once the model, optimizers and loops hold the capture and the data fetcher exists:
    from a Callback's ``on_train_start`` under ``fit(ckpt_path=...)``, or by a custom fit loop
    after :func:`restore_loops_mid_epoch`. Puts the data back (:func:`fast_forward`), then the
    epoch aggregates, torchmetrics states, Lightning's metric dicts and pending gradients, then
    every RNG, last. When the result is not exact nothing past the data is restored and the
    trainer must not go on: restart from the checkpoint at the epoch's start instead.
    """
    mid = flor_state["mid_epoch"]
    here = (trainer.current_epoch, trainer.global_step, trainer.num_training_batches)
    recorded = (mid["epoch"], mid["global_step"], mid["num_training_batches"])
    if here != recorded:
        return not_exact(
            f"the trainer stands at (epoch, global step, batches per epoch) {here}, the capture at {recorded}; "
            "resume with the Trainer settings and data the run was recorded with"
        )
    result = fast_forward(trainer, mid["data_rng"], batches=mid["batches"])
    if not result.exact:
        return result
    module = trainer.lightning_module
    aggregates = _restore_results(trainer, mid["results"])
    _restore_metric_states(module, mid["metrics"])
    _restore_logger_state(trainer, mid["logger"])
    grads = mid["grads"] or {}
    for name, param in module.named_parameters():
        if name in grads:
            param.grad = grads[name].to(param.device, copy=True)
    # Lightning skips the epoch-end step of ReduceLROnPlateau schedulers while the fit loop reads as
    # restarting (it has no metrics then); flor restored them, so the epoch ends as it did when recorded.
    trainer.fit_loop._restarting = False
    rng.restore(flor_state["rng"])
    return Exactness(True, how=result.how, aggregates=aggregates)


def fast_forward(trainer: pl.Trainer, data_rng: dict[str, Any], *, batches: int) -> Exactness:
    """Re-create the training data iterator as the recording had it after ``batches`` batches of this epoch.

    Stateful loaders load their own saved state. Otherwise every generator is set to the state
    it had before the epoch's iterator was made, the iterator is made, its first batch fetched
    and the generators compared with their state at the epoch's first batch: a difference means
    something between those points drew random numbers (a user ``on_train_epoch_start`` hook,
    say), and the result is "not exact". Then ``batches - 1`` more are skipped: a single-process
    loader advances its index sampler without loading data, others fetch and discard.
    """
    if batches < 1:
        raise ValueError(f"fast_forward needs at least one batch done, got batches={batches}")
    fit_loop = trainer.fit_loop
    fetcher, combined = fit_loop._data_fetcher, fit_loop._combined_loader
    assert fetcher is not None and combined is not None
    how = _data_skip(trainer)
    if how == "stateful":
        pending = bool(fit_loop._combined_loader_states_to_load)
        fit_loop._load_combined_loader_states()  # under fit(ckpt_path=...) Lightning did it in setup_data
        if pending:
            iter(fetcher)
        return Exactness(True, how=how)
    if how not in ("sampler", "fetch"):
        return not_exact(how)
    rng.restore(data_rng["before_iterator"])
    for dl in combined.flattened:
        _set_sampler_epoch(dl, trainer.current_epoch)
    iter(fetcher)
    modes = combined._iterator
    assert modes is not None
    try:
        next(modes)  # the first batch is loaded for real: loading may draw random numbers too
        drift = rng.differs(rng.capture(), data_rng["first_batch"])
        if drift:
            return not_exact(
                f"the {' and '.join(drift)} random state differs at the epoch's first batch from the recording's: "
                "something between the epoch's start and its first batch draws random numbers outside the data "
                "loader (a hook such as on_train_epoch_start?); re-train from the epoch's start"
            )
        return Exactness(True, how=_skip(modes, batches - 1, sampler=how == "sampler"))
    except StopIteration:
        return not_exact(f"the training data ran out before batch {batches} of the epoch; it is not the recorded data")


def _data_skip(trainer: pl.Trainer) -> str:
    """:func:`~flor_lightning._midepoch.data_skip` for this trainer's training data."""
    fetcher, combined = trainer.fit_loop._data_fetcher, trainer.fit_loop._combined_loader
    assert fetcher is not None and combined is not None
    return data_skip(
        [_loader_facts(dl) for dl in combined.flattened],
        dataloader_iter=isinstance(fetcher, _DataLoaderIterDataFetcher),
        sized=fetcher.length is not None,
    )


def _skip(modes: _ModeIterator, n: int, *, sampler: bool) -> SkipHow:
    """Skip ``n`` training batches: by advancing a single-process loader's index sampler (no data
    loaded) where ``sampler`` allows, else by fetching them; returns which it did."""
    single = modes.iterators[0] if len(modes.iterators) == 1 else None
    if sampler and isinstance(single, _SingleProcessDataLoaderIter):
        for _ in range(n):
            single._next_index()  # type: ignore[no-untyped-call]
        single._num_yielded += n  # as _BaseDataLoaderIter.__next__ counts
        modes._idx += n
        return "sampler"
    for _ in range(n):
        next(modes)
    return "fetch"


def _loader_facts(dl: object) -> LoaderFacts:
    if isinstance(dl, DataLoader):
        iterable = isinstance(dl.dataset, IterableDataset)
        workers, persistent = dl.num_workers, dl.persistent_workers
    else:  # any iterable Lightning accepts: a list of batches replays, anything else is a stream
        iterable, workers, persistent = not isinstance(dl, (list, tuple)), 0, False
    return LoaderFacts(iterable, isinstance(dl, _Stateful), workers, persistent)


def _results_state(results: _ResultCollection) -> dict[str, Any]:
    """The training epoch aggregates as plain data: ``{"entries": [...]}``, or ``{"reason": why not}``."""
    names = {id(fn): name for name, fn in _REDUCTIONS.items()}
    entries = []
    for key, metric in results.items():
        meta = metric.meta
        reduce = names.get(id(meta.reduce_fx))
        if reduce is None or meta.sync.group is not None:
            why = "a reduction flor cannot name" if reduce is None else "a sync_dist_group"
            return {"reason": f"{meta.name!r} is logged with {why}, so its epoch aggregate cannot be checkpointed"}
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.name != "_sync"}
        entry: dict[str, Any] = {
            "key": key,
            "meta": {**fields, "reduce_fx": reduce},
            "sync": {"should": meta.sync.should, "rank_zero_only": meta.sync.rank_zero_only},
            "is_tensor": metric.is_tensor,
            "has_reset": metric.has_reset,
            "update_count": metric._update_count,
        }
        if metric.is_tensor:
            entry["value"] = metric.value
            if meta.is_mean_reduction:
                entry["cumulated_batch_size"] = metric.cumulated_batch_size
        entries.append(entry)
    return {"entries": entries}


def _restore_results(trainer: pl.Trainer, saved: dict[str, Any]) -> str:
    """Rebuild the training epoch aggregates; returns why they could not be (empty when they were)."""
    results = trainer.fit_loop.epoch_loop._results
    results.clear()
    if "reason" in saved:
        return str(saved["reason"])
    modules = dict(trainer.lightning_module.named_modules())
    for entry in saved["entries"]:
        meta = _Metadata(**{**entry["meta"], "reduce_fx": _REDUCTIONS[entry["meta"]["reduce_fx"]]})
        sync = entry["sync"]
        meta.sync = _Sync(_should=sync["should"], fn=trainer.strategy.reduce, rank_zero_only=sync["rank_zero_only"])
        metric = _ResultMetric(meta, entry["is_tensor"])
        if entry["is_tensor"]:
            metric.value = entry["value"].clone()
            if "cumulated_batch_size" in entry:
                metric.cumulated_batch_size = entry["cumulated_batch_size"].clone()
        else:
            value = modules.get(meta.metric_attribute or "")
            if not isinstance(value, Metric):
                results.clear()
                return f"the module has no torchmetrics Metric {meta.metric_attribute!r}, logged as {meta.name!r}"
            metric.value = value
        metric.has_reset, metric._update_count = entry["has_reset"], entry["update_count"]
        results[entry["key"]] = metric
    return ""


def _reset_after(trainer: pl.Trainer, moment: Moment) -> set[int]:
    """The torchmetrics Metrics Lightning resets right after this moment (ids): at ``on_validation_end``,
    those logged in the validation (its results are reset once the hook has run)."""
    if moment != "validation_end":
        return set()
    return {id(m.value) for m in trainer.fit_loop.epoch_loop.val_loop._results.values() if not m.is_tensor}


def _metric_states(module: pl.LightningModule, *, reset: set[int]) -> dict[str, Any]:
    """The states of the torchmetrics Metrics in ``module`` (not in its state_dict: they are not persistent);
    those in ``reset`` as ``Metric.reset()`` leaves them."""
    return {
        name: (
            {"state": m._defaults, "update_count": 0}
            if id(m) in reset
            else {"state": m.metric_state, "update_count": m._update_count}
        )
        for name, m in module.named_modules()
        if isinstance(m, Metric)
    }


def _restore_metric_states(module: pl.LightningModule, saved: dict[str, Any]) -> None:
    modules = dict(module.named_modules())
    for name, entry in saved.items():
        metric = modules.get(name)
        if not isinstance(metric, Metric):
            raise CheckpointError(
                f"the capture holds the state of torchmetrics Metric {name!r}, which the module lacks; "
                "resume with the model the run was recorded with"
            )
        for attr, value in entry["state"].items():
            copy = [v.to(metric.device, copy=True) for v in value] if isinstance(value, list) else None
            setattr(metric, attr, copy if copy is not None else value.to(metric.device, copy=True))
        metric._update_count, metric._computed = entry["update_count"], None


def _logger_state(trainer: pl.Trainer) -> dict[str, Any]:
    connector = trainer._logger_connector
    return {
        "callback": dict(connector._callback_metrics),
        "logged": dict(connector._logged_metrics),
        "progress_bar": dict(connector._progress_bar_metrics),
    }


def _restore_logger_state(trainer: pl.Trainer, saved: dict[str, Any]) -> None:
    connector = trainer._logger_connector
    connector._callback_metrics = dict(saved["callback"])
    connector._logged_metrics = dict(saved["logged"])
    connector._progress_bar_metrics = dict(saved["progress_bar"])
    # the next batch is not the epoch's first: a True/None here would make the first self.log reset
    # the restored aggregates (LoggerConnector.should_reset_tensors)
    connector._first_loop_iter = False


def _pending_grads(trainer: pl.Trainer) -> dict[str, Tensor] | None:
    """Gradients accumulated for an optimizer step still to come, by parameter name; None when none are."""
    module = trainer.lightning_module
    if module.automatic_optimization and not trainer.fit_loop.epoch_loop._should_accumulate():
        return None
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


class StoppableEpochLoop(_TrainingEpochLoop):
    """A training epoch loop that a custom fit loop can stop after a given number of the epoch's batches.

    Set :attr:`stop_after` (batches of the epoch, counted from its start) before the epoch runs;
    the loop ends once that many are done and their validation, if due, has run. The fit loop
    then checks :attr:`stopped_early` and skips its epoch end (no epoch-end hooks, no epoch
    aggregates: they belong to whoever runs the epoch to its end).
    """

    def __init__(self, trainer: pl.Trainer, min_steps: int | None = None, max_steps: int = -1) -> None:
        super().__init__(trainer, min_steps=min_steps, max_steps=max_steps)
        self.stop_after: int | None = None
        self.complete: set[str] | None = None  # the aggregates' keys restored inside the epoch (None: from its start)

    @property
    def stopped_early(self) -> bool:
        """Whether the epoch stopped at :attr:`stop_after`, before its own end."""
        stop = self.stop_after
        return stop is not None and self.batch_progress.current.completed >= stop and not self._is_training_done

    @property
    @override
    def done(self) -> bool:
        return self.stopped_early or super().done
