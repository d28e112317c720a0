"""FlorCallback: records a Lightning run (every logged value, checkpoints, code version).

Its hooks gather from the Trainer and delegate: the run's records to the run session
(:mod:`flor_lightning._session`), when to checkpoint to the schedule (:mod:`flor_lightning._schedule`),
what the run's row says to :mod:`flor_lightning._metadata`, the code snapshot to
:func:`flor_lightning._codeversion.commit_code`, each ``self.log`` call to :mod:`flor_lightning._capture`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from flor_lightning import _codeversion as codeversion
from flor_lightning import _lightning
from flor_lightning import _metadata as metadata
from flor_lightning import _rng as rng
from flor_lightning import _schedule as schedule
from flor_lightning import _trackers as trackers
from flor_lightning._blobs import MANIFEST_SUFFIX
from flor_lightning._capture import LogCapture
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import CheckpointError, ConfigError, FlorError
from flor_lightning._locate import Location, checkpoint_root, locate, open_fs, script
from flor_lightning._midepoch import EpochRngTracker, Moment
from flor_lightning._session import ResumeFrom, RunSession
from flor_lightning._shadow import DEFAULT_MAX_FILE_BYTES

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from flor_lightning._runs import Status

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")


AUTO = "auto"


@dataclass(frozen=True)
class RecordStats:
    """What recording has cost so far; :attr:`FlorCallback.stats` stays readable after ``fit``.

    Attributes:
        checkpoints_written: checkpoint files written and renamed into place.
        checkpoint_bytes: their total size.
        writer_cpu_seconds: CPU time of the background checkpoint writer (all writes, failed ones too).
        blocked_seconds: training-thread time spent waiting for an earlier write to finish.
        snapshot_seconds: training-thread time spent copying the state to checkpoint.
        state_seconds: training-thread time spent collecting that state from the Trainer (Lightning's checkpoint dict).
        rng_seconds: training-thread time spent capturing the random generators' states (for each checkpoint and
            before each validation).
        store_seconds: training-thread time spent writing the run's row and each epoch's row to the store.
        code_seconds: time spent committing the code snapshot to the ``flor.shadow`` branch.
        log_writer_cpu_seconds: CPU time of the background log writer (encoding and committing the logged values).
        checkpoint_every: the checkpoint period in force (with ``"auto"``, the latest one chosen).
        checkpoint_every_steps: with ``"auto"``, the period in optimizer steps chosen last inside an epoch
            (None: none chosen, the run had no checkpoint moment inside an epoch or a fixed period).
    """

    checkpoints_written: int = 0
    checkpoint_bytes: int = 0
    writer_cpu_seconds: float = 0.0
    blocked_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    state_seconds: float = 0.0
    rng_seconds: float = 0.0
    store_seconds: float = 0.0
    code_seconds: float = 0.0
    log_writer_cpu_seconds: float = 0.0
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None


class FlorCallback(Callback):
    """Records a training run for hindsight logging.

    Every ``self.log`` value (every step, independent of ``log_every_n_steps`` and of
    ``logger=False``), the epoch aggregates, hyperparameters, Trainer settings and versions
    go to the sqlite log store ``.flor/flor.db`` at the git repository root; the full training
    state is checkpointed in the background after every ``checkpoint_every``-th epoch (and
    the last one); the code is committed to the ``flor.shadow`` branch, without the run's outputs
    (the Trainer's log and checkpoint folders, flor's own files: see :mod:`flor_lightning._codeversion`).

    With ``checkpoint_every="auto"`` the period adapts so that checkpointing's CPU time (the
    snapshot plus the background write, measured on the latest checkpoint) stays under
    ``checkpoint_budget`` of the epoch time: the initial state and the last epoch are always
    checkpointed, in between every ``ceil(cost / (budget x epoch time))``-th epoch. Replay
    re-trains forward from the nearest earlier checkpoint where one is missing.

    The checkpoint of epoch ``e`` is the state once epoch ``e`` is entirely done (its
    validation, epoch-end hooks and scheduler step included): it is taken as epoch ``e + 1``
    starts, or as training ends. Checkpoint ``-1`` is the state before the first epoch.

    Inside an epoch, the state is checkpointed at the end of each validation point
    (``val_check_interval``) and, with ``checkpoint_every_n_steps=N``, after every N-th
    optimizer step: a capture a replay (or ``fit(ckpt_path=...)``) continues from exactly,
    data position included (:mod:`flor_lightning._midepoch`). With ``"auto"`` these moments are
    taken once the training since the latest checkpoint pays for one within the budget
    (:func:`flor_lightning._schedule.due_inside`), validation points first.

    Args:
        checkpoint_every: checkpoint every this many epochs (the final epoch always is), or
            ``"auto"``: as often as ``checkpoint_budget`` allows.
        checkpoint_budget: with ``checkpoint_every="auto"``, the share of epoch time that
            checkpointing may take in CPU time (default 0.02: 2%).
        checkpoint_every_n_steps: also checkpoint inside an epoch after every this many
            optimizer steps (default None: only at validation points inside an epoch).
        checkpoint_dir: checkpoint root, a local path or fsspec URL; default
            ``$FLOR_HOME/<project>`` or ``~/.flor/<project>``.
        max_file_bytes: files larger than this stay out of the code snapshot.
        flush_interval: seconds between background flushes of logged values.

    Example:
        >>> import lightning as L
        >>> import flor_lightning as flor
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[flor.FlorCallback()])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        checkpoint_every: int | Literal["auto"] = 1,
        checkpoint_budget: float = 0.02,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_dir: str | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if checkpoint_every != AUTO and (
            not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1
        ):
            raise ConfigError(f"checkpoint_every must be a whole number >= 1 or 'auto', got {checkpoint_every!r}")
        if not isinstance(checkpoint_budget, (int, float)) or not 0 < checkpoint_budget <= 1:
            raise ConfigError(
                f"checkpoint_budget must be a fraction of epoch time in (0, 1], e.g. 0.02; got {checkpoint_budget!r}"
            )
        if checkpoint_every_n_steps is not None and (
            not isinstance(checkpoint_every_n_steps, int)
            or isinstance(checkpoint_every_n_steps, bool)
            or checkpoint_every_n_steps < 1
        ):
            raise ConfigError(
                f"checkpoint_every_n_steps must be a whole number of optimizer steps >= 1 or None, "
                f"got {checkpoint_every_n_steps!r}; e.g. 100"
            )
        if flush_interval <= 0:
            raise ConfigError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        if not isinstance(max_file_bytes, int) or isinstance(max_file_bytes, bool) or max_file_bytes < 0:
            raise ConfigError(
                f"max_file_bytes must be a whole number of bytes >= 0, got {max_file_bytes!r}; "
                f"e.g. {DEFAULT_MAX_FILE_BYTES} (5 MB, the default)"
            )
        if checkpoint_dir is not None and "://" in checkpoint_dir:
            open_fs(checkpoint_dir)  # an fsspec protocol that is not installed is refused here
        if checkpoint_dir is not None and "://" not in checkpoint_dir and not Path(checkpoint_dir).parent.is_dir():
            raise ConfigError(
                f"checkpoint_dir {checkpoint_dir!r}: its parent folder does not exist; create it or choose another"
            )
        self.checkpoint_every = checkpoint_every
        self.checkpoint_budget = float(checkpoint_budget)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.checkpoint_dir = checkpoint_dir
        self.max_file_bytes = max_file_bytes
        self.flush_interval = flush_interval
        self._clock = clock
        self.run_id: str | None = None
        self.replay_id: str | None = None  # set by replay: values then land beside the recording
        self.db_path: Path | None = None  # set by replay on a rank off the launching node: its node store
        self.capture = LogCapture()
        self.location: Location | None = None
        self._session: RunSession | None = None
        self._fit: RunSession | None = None  # the latest fit's, kept after it closes for stats
        self._resume_from: ResumeFrom | None = None
        self._resume_inside: dict[str, Any] | None = None  # the "flor" part of a checkpoint inside an epoch
        self._rng_at_validation: dict[str, Any] | None = None
        self._data_rng = EpochRngTracker()  # what a checkpoint inside an epoch needs to put the data back
        self._step_seen = 0  # the global step at the latest training batch end
        self._checkpointed_at = 0.0  # the clock at the latest checkpoint
        self._step_period_chosen: int | None = None
        self._period = 1 if checkpoint_every == AUTO else int(checkpoint_every)
        self._snapshot_seconds = 0.0
        self._last_snapshot_seconds = 0.0
        self._seconds = dict.fromkeys(("state", "rng", "store", "code"), 0.0)  # RecordStats' <key>_seconds

    @property
    def session(self) -> RunSession | None:
        """The run session open now (None between runs): its log writer and checkpoint store, for
        tools and tests that watch a recording."""
        return self._session

    # ---- session life cycle -------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        mine = [cb for cb in trainer.callbacks if isinstance(cb, FlorCallback)]  # type: ignore[attr-defined]
        if len(mine) > 1:
            raise ConfigError(
                f"{len(mine)} FlorCallback instances are attached to one Trainer; attach exactly one "
                "(flor.Trainer attaches its own, so do not pass another to it)."
            )
        self.capture.attach(pl_module)
        _lightning.read_manifests(trainer, _load_manifest, MANIFEST_SUFFIX)  # fit(ckpt_path=flor.last_checkpoint())
        self._resume_from, self._resume_inside = None, None
        # A recorded fit opens its run in on_train_start, once Lightning has restored any ckpt_path
        # (so a resumed run is known); the sanity check before it is never recorded anyway.
        if (self._session is None and self.replay_id is not None) or (stage != "fit" and trainer.is_global_zero):
            self._session = self._open(trainer, pl_module, fitting=False)

    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, fitting: bool) -> RunSession:
        loc = locate()
        self.location = loc = loc if self.db_path is None else replace(loc, db_path=self.db_path)
        checkpoints = None
        if fitting:
            self._seconds = dict.fromkeys(self._seconds, 0.0)
            self._step_period_chosen = None
            checkpoints = CheckpointStore(checkpoint_root(loc.project, self.checkpoint_dir))
        session = RunSession.open(
            loc,
            run_id=self.run_id,
            replay_id=self.replay_id,
            checkpoints=checkpoints,
            resume_from=self._resume_from,  # fit(ckpt_path=flor.last_checkpoint(run)): continue that run
            new_run=partial(self._new_run, trainer, pl_module, loc),
            flush_interval=self.flush_interval,
            clock=self._clock,
        )
        self.run_id = session.run_id
        if session.checkpoints is not None:
            self._fit, self._snapshot_seconds = session, 0.0
        self.capture.start(session.writer, session.run_id, self.replay_id)
        return session

    def _new_run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loc: Location, run_id: str, ckpt_url: str | None
    ) -> dict[str, Any]:
        """The row of a new run, its code committed first."""
        message = f"flor run {run_id}: {script(loc)}"
        exclude = codeversion.run_exclusions(loc, trainer, ckpt_url)
        version = self._timed(
            "code", codeversion.commit_code, loc, message, exclude=exclude, max_file_bytes=self.max_file_bytes
        )
        return metadata.run_row(
            run_id, loc=loc, trainer=trainer, pl_module=pl_module, version=version, checkpoint_root=ckpt_url
        )

    def _close(self, status: Status | None) -> None:
        session, self._session = self._session, None
        self.capture.stop()
        if session is not None:
            self._seconds["store"] += session.store_seconds
            session.close(status)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.capture.detach()
        self._close("finished" if self._session is not None and self._session.owns_run else None)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.capture.detach()
        try:
            self._close("failed")
        except FlorError as err:  # never let flor's own trouble hide the user's exception
            log.error("flor: while closing the failed run: %s", err)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores no RNG state. Set it back now, before the fit loop makes the first
        # epoch's data iterator (on a restart Lightning makes it before any epoch hook runs; the
        # sanity check in between runs with an isolated RNG), so the resumed trajectory is the
        # uninterrupted one.
        flor = checkpoint.get("flor", {})
        if self.replay_id is None and "epoch" in flor:
            rng.restore(flor["rng"])
            self._resume_from = (flor["run_id"], flor["epoch"])
        elif self.replay_id is None and "mid_epoch" in flor and "run_id" in flor:  # inside an epoch: on_train_start
            mid = flor["mid_epoch"]
            self._resume_from = (flor["run_id"], mid["epoch"], mid["batches"] - 1, mid["global_step"])
            self._resume_inside = flor

    # ---- capturing self.log ----------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_seen = trainer.global_step
        if self.replay_id is None:
            self._data_rng.fit_started(self._timed("rng", rng.capture))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.capture.batch_started(trainer, batch_idx)
        if self._recording() and self._data_rng.waiting(trainer.current_epoch):
            self._data_rng.batch_started(trainer.current_epoch, self._timed("rng", rng.capture))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._step_seen = trainer.global_step > self._step_seen, trainer.global_step
        if stepped and self.checkpoint_every_n_steps is not None:
            self._checkpoint_inside(trainer, "train_batch_end")

    def _recording(self) -> RunSession | None:
        """The session of the fit being recorded now (None otherwise)."""
        session = self._session
        return session if session is not None and session.checkpoints is not None else None

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.capture.batch_started(trainer, batch_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.capture.batch_started(trainer, batch_idx)

    # Batch-end hooks run before the module's own batch-end hook, so the batch context is cleared
    # when the next epoch-level phase begins instead (callback epoch hooks run before the module's).
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()
        session = self._session
        if session is None or session.checkpoints is None:
            return
        self._data_rng.epoch_started(trainer.current_epoch, self._timed("rng", rng.capture))
        session.epoch_starting()
        done = trainer.current_epoch - 1  # epoch 0 too: checkpoint -1 is the initial state, replay re-trains from it
        if self.checkpoint_every == AUTO:
            self._update_period(session.checkpoints, session.epoch_seconds)
        if self._due(session, done):
            self._checkpoint(trainer, session)
        session.epoch_started()

    def _resume_inside_epoch(self, trainer: pl.Trainer, flor: dict[str, Any]) -> None:
        """Continue from a checkpoint taken inside an epoch: the data position, aggregates, metric states,
        pending gradients and RNGs as they were (:func:`flor_lightning._lightning.resume_mid_epoch`).

        Raises:
            CheckpointError: the run cannot continue from there exactly (the reason says why).
        """
        self._data_rng.resumed(flor["mid_epoch"]["data_rng"])
        result = _lightning.resume_mid_epoch(trainer, flor)
        if not result.exact:
            raise CheckpointError(
                f"run {flor['run_id']} cannot continue exactly from its checkpoint inside epoch "
                f"{flor['mid_epoch']['epoch']}: {result.reason}. Resume from the checkpoint at the end of the epoch "
                "before it instead (flor show lists the run's checkpoints)"
            )
        if result.aggregates:
            log.warning("flor: %s", result.aggregates)

    def _update_period(self, checkpoints: CheckpointStore, epoch_seconds: float) -> None:
        """The ``"auto"`` period from the latest checkpoint's cost."""
        if checkpoints.last_write_cpu_seconds is None:
            checkpoints.join()  # the first write's cost sets the period, so it is known before deciding
        self._period = schedule.next_period(
            self._period,
            write_cpu_seconds=checkpoints.last_write_cpu_seconds,
            snapshot_seconds=self._last_snapshot_seconds,
            epoch_seconds=epoch_seconds,
            budget=self.checkpoint_budget,
        )

    def _due(self, session: RunSession, epoch: int) -> bool:
        """Whether the state at the end of ``epoch`` is to be checkpointed now, and is not yet."""
        last, auto = max(session.checkpointed, default=None), self.checkpoint_every == AUTO
        return epoch not in session.checkpointed and schedule.due(
            epoch, period=self._period, last_checkpointed=last, auto=auto
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._session is None and trainer.is_global_zero:
            self._session = self._open(trainer, pl_module, fitting=True)
        inside, self._resume_inside = self._resume_inside, None
        if inside is not None:
            self._resume_inside_epoch(trainer, inside)
        session = self._session
        if session is not None and session.checkpoints is not None:
            # fused optimizer steps and BatchNorm statistics bump no version counter: the store watches them
            session.checkpoints.watch(pl_module, trainer.optimizers)
            # the loggers' identities find each logger's run again (replay writes there)
            session.add_settings(metadata.data_sizes(trainer), trackers.identities(trainer.loggers))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        session = self._session
        if session is not None and trainer.current_epoch > 0 and trainer.current_epoch - 1 not in session.checkpointed:
            self._checkpoint(trainer, session, verify=True)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()
        session = self._session
        if not trainer.sanity_checking and session is not None and session.checkpoints is not None:
            session.validation_started()
            self._rng_at_validation = self._timed("rng", rng.capture)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.epoch_ended(trainer, "validate")
        session = self._session
        if not trainer.sanity_checking and session is not None and session.checkpoints is not None:
            session.validation_ended()
            self._checkpoint_inside(trainer, "validation_end")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.epoch_ended(trainer, "test")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the module's on_train_epoch_end: what that hook logs is stored as it is logged.
        self.capture.epoch_ended(trainer, "train")
        session = self._session
        if session is not None and session.checkpoints is not None:
            session.write_epoch(trainer.current_epoch)

    def _checkpoint(self, trainer: pl.Trainer, session: RunSession, *, verify: bool = False) -> None:
        """Snapshot the state of the epoch just completed and write it in the background.

        Only the tensors that changed since the previous checkpoint are copied; with ``verify`` (the run's
        last checkpoint) the others are hashed too, catching writes no version counter saw.
        """
        if session.checkpoints is None:
            return
        state = self._timed("state", _lightning.dump_state, trainer)
        epoch, step = trainer.current_epoch - 1, trainer.global_step
        state["flor"] = {
            "run_id": session.run_id,
            "epoch": epoch,
            "rng": self._timed("rng", rng.capture),
            "rng_at_validation": self._rng_at_validation,
        }
        session.checkpointed.add(epoch)
        self._write(session, state, epoch, step, None, None, verify=verify)

    def _checkpoint_inside(self, trainer: pl.Trainer, moment: Moment) -> None:
        """Checkpoint the state inside the epoch at ``moment`` where the schedule says so and a restart
        from it can continue the run (not at the epoch's last batch: its end is checkpointed)."""
        session = self._recording()
        data_rng = self._data_rng.data_rng(trainer.current_epoch)
        if session is None or data_rng is None or _lightning.mid_epoch_refusal(trainer, moment) is not None:
            return
        step = trainer.global_step
        period = self._step_period(session, step) if self.checkpoint_every == AUTO else None
        validation = moment == "validation_end"
        every = self.checkpoint_every_n_steps
        if not schedule.due_inside(
            step, validation=validation, every_n_steps=every, last_step=session.last_step, period=period
        ):
            return
        state = self._timed(
            "state",
            _lightning.capture_mid_epoch,
            trainer,
            moment,
            data_rng=data_rng,
            rng_at_validation=self._rng_at_validation,
        )
        state["flor"]["run_id"] = session.run_id
        self._write(session, state, trainer.current_epoch, step, state["flor"]["mid_epoch"]["batches"] - 1, moment)

    def _step_period(self, session: RunSession, step: int) -> int:
        """The ``"auto"`` period in optimizer steps: the latest checkpoint's cost against the time of a step
        since then (1 before any checkpoint of this session)."""
        checkpoints = session.checkpoints
        if session.last_step is None or checkpoints is None or step <= session.last_step:
            return 1
        if checkpoints.last_write_cpu_seconds is None:
            checkpoints.join()  # the first write's cost sets the period, so it is known before deciding
        step_seconds = (self._clock() - self._checkpointed_at) / (step - session.last_step)
        self._step_period_chosen = schedule.next_period(
            1,
            write_cpu_seconds=checkpoints.last_write_cpu_seconds,
            snapshot_seconds=self._last_snapshot_seconds,
            epoch_seconds=step_seconds,
            budget=self.checkpoint_budget,
        )
        return self._step_period_chosen

    def _write(
        self,
        session: RunSession,
        state: dict[str, Any],
        epoch: int,
        step: int,
        batch_idx: int | None,
        moment: Moment | None,
        *,
        verify: bool = False,
    ) -> None:
        """Snapshot ``state`` (only what changed; with ``verify``, hashing the rest) and write it in the
        background as the checkpoint of ``epoch``'s end (``batch_idx`` None) or inside it."""
        if session.checkpoints is None:
            return
        self._checkpointed_at = self._clock()
        try:
            start = time.perf_counter()
            copy = session.checkpoints.snapshot(state, verify=verify)
            self._last_snapshot_seconds = time.perf_counter() - start
            self._snapshot_seconds += self._last_snapshot_seconds
            session.save_checkpoint(copy, epoch, step, batch_idx=batch_idx, moment=moment)
        except CheckpointError as err:
            # Training goes on: a full or read-only checkpoint store must not cost the user the run.
            # The failed file never reached its final name nor the index, so the store stays
            # consistent, and replay works around the missing epoch.
            log.warning("flor: %s; training continues, and replay will re-train around that epoch", err)

    def _timed(self, what: str, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)``, its duration added to :attr:`stats`' ``<what>_seconds``."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._seconds[what] += time.perf_counter() - start

    @property
    def stats(self) -> RecordStats:
        """What recording the latest fit cost so far; still readable once the fit has ended."""
        c = self._fit.checkpoints if self._fit else None
        w = self._fit.writer if self._fit else None
        s, live = self._seconds, self._session.store_seconds if self._session else 0.0
        return RecordStats(
            checkpoints_written=c.written if c else 0,
            checkpoint_bytes=c.bytes_written if c else 0,
            writer_cpu_seconds=c.writer_cpu_seconds if c else 0.0,
            blocked_seconds=c.blocked_seconds if c else 0.0,
            snapshot_seconds=self._snapshot_seconds,
            state_seconds=s["state"],
            rng_seconds=s["rng"],
            store_seconds=s["store"] + live,
            code_seconds=s["code"],
            log_writer_cpu_seconds=w.cpu_seconds if w else 0.0,
            checkpoint_every=self._period,
            checkpoint_every_steps=self._step_period_chosen,
        )


def _load_manifest(path: str) -> dict[str, Any]:
    """A checkpoint flor wrote, for Lightning's ``fit(ckpt_path=...)``: each blob verified against its hash."""
    return CheckpointStore(path).load(path, None)
