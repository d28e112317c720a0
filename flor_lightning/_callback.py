"""FlorCallback: records a Lightning run (every logged value, checkpoints, code version)."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from flor_lightning import _codeversion as codeversion
from flor_lightning import _lightning
from flor_lightning import _rng as rng
from flor_lightning import _schedule as schedule
from flor_lightning import _store as store
from flor_lightning import _trackers as trackers
from flor_lightning._capture import LogCapture
from flor_lightning._checkpoints import CheckpointInfo, CheckpointStore, snapshot
from flor_lightning._errors import CheckpointError, ConfigError, FlorError
from flor_lightning._locate import (
    Location,
    checkpoint_root,
    ignore_flor_folder,
    locate,
    open_fs,
    process_local,
    relative,
    script,
)
from flor_lightning._resume import recorded_checkpoints, reopen_run, run_exists
from flor_lightning._shadow import DEFAULT_MAX_FILE_BYTES

if TYPE_CHECKING:
    import sqlite3

    import lightning.pytorch as pl

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


def new_run_id(now: float) -> str:
    """A sortable, unique run id such as ``20261128-120501-3f9a1c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Session:
    """What one fit/validate/test call records into."""

    run_id: str
    replay_id: str | None
    conn: sqlite3.Connection
    writer: store.LogWriter
    checkpoints: CheckpointStore | None
    lock: threading.Lock = field(default_factory=threading.Lock)


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

    Args:
        checkpoint_every: checkpoint every this many epochs (the final epoch always is), or
            ``"auto"``: as often as ``checkpoint_budget`` allows.
        checkpoint_budget: with ``checkpoint_every="auto"``, the share of epoch time that
            checkpointing may take in CPU time (default 0.02: 2%).
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
        self.checkpoint_dir = checkpoint_dir
        self.max_file_bytes = max_file_bytes
        self.flush_interval = flush_interval
        self._clock = clock
        self.run_id: str | None = None
        self.replay_id: str | None = None  # set by replay: values then land beside the recording
        self.capture = LogCapture()
        self.location: Location | None = None
        self._session: _Session | None = None
        self._epoch_started = 0.0
        self._val_started = 0.0
        self._val_seconds = 0.0
        self._rng_at_validation: dict[str, Any] | None = None
        self._owns_run_until: str | None = None  # "fit" or "stage" while this callback's run is open
        self._resume_from: tuple[str, int] | None = None
        self._checkpoint_epochs: set[int] = set()
        self._period = 1 if checkpoint_every == AUTO else int(checkpoint_every)
        self._previous_epoch_start: float | None = None
        self._epoch_seconds = 0.0
        self._checkpoints: CheckpointStore | None = None  # the latest run's, kept after it closes for stats
        self._snapshot_seconds = 0.0
        self._last_snapshot_seconds = 0.0
        self._seconds = dict.fromkeys(("state", "rng", "store", "code"), 0.0)  # RecordStats' <key>_seconds
        self._log_writer: store.LogWriter | None = None  # the latest fit's, kept after it closes for stats

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
        self._resume_from = None
        # A recorded fit opens its run in on_train_start, once Lightning has restored any ckpt_path
        # (so a resumed run is known); the sanity check before it is never recorded anyway.
        if (self._session is None and self.replay_id is not None) or (stage != "fit" and trainer.is_global_zero):
            self._session = self._open(trainer, pl_module, fitting=False)

    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, fitting: bool) -> _Session:
        self.location = loc = locate()
        self._checkpoint_epochs = set()
        self._previous_epoch_start = None
        checkpoints = None
        run_id = self.run_id
        if fitting:
            self._seconds = dict.fromkeys(self._seconds, 0.0)
            run_id = new_run_id(self._clock())
            checkpoints = CheckpointStore(checkpoint_root(loc.project, self.checkpoint_dir))
        conn = store.connect(loc.db_path)  # a damaged store or one under a file fails here, before any folder
        try:
            if fitting or run_id is None:  # a run is about to be written: read-only or damaged stops it here
                store.check_writable(conn, loc.db_path)
            ignore_flor_folder(loc.db_path.parent)
            if checkpoints is not None:
                checkpoints.check_writable(f"{checkpoints.root}/{run_id}")  # before anything is written
        except (FlorError, OSError):
            conn.close()
            raise
        if checkpoints is not None and process_local(checkpoints.fs):
            log.warning(
                "flor: checkpoints go to %s, which lives in this process's memory: they vanish when it exits, "
                "and a replay in another process re-trains instead of restoring. Use a folder or an object "
                "store (FlorCallback(checkpoint_dir=...) or FLOR_HOME) to keep them",
                checkpoints.url,
            )
        self._owns_run_until = None
        resumed = (
            self._resume_from if fitting and self._resume_from and run_exists(conn, self._resume_from[0]) else None
        )
        if resumed is not None:  # fit(ckpt_path=flor.last_checkpoint(run)): continue that run's records
            run_id, epoch = resumed
            reopen_run(conn, run_id, epoch)
            root = store.fetch(conn, "SELECT checkpoint_root FROM runs WHERE run_id = ?", [run_id])[0]
            checkpoints = CheckpointStore(root["checkpoint_root"])
            self._checkpoint_epochs = recorded_checkpoints(conn, run_id)
            self._owns_run_until = "fit"
        elif fitting or run_id is None:  # a fit, or validate/test with no fit before it
            run_id = run_id or new_run_id(self._clock())
            try:
                self._insert_run(conn, run_id, trainer, pl_module, loc, checkpoints.url if checkpoints else None)
            except BaseException:
                conn.close()
                raise
            self._owns_run_until = "fit" if fitting else "stage"
        self.run_id = run_id
        writer = store.LogWriter(lambda: store.connect(loc.db_path), interval=self.flush_interval)
        if checkpoints is not None:
            self._checkpoints, self._snapshot_seconds, self._log_writer = checkpoints, 0.0, writer
        self.capture.start(writer, run_id, self.replay_id)
        return _Session(run_id, self.replay_id, conn, writer, checkpoints)

    def _insert_run(
        self,
        conn: sqlite3.Connection,
        run_id: str,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loc: Location,
        ckpt_url: str | None,
    ) -> None:
        rel_script = script(loc)
        exclude = codeversion.run_exclusions(loc, trainer, ckpt_url)
        message = f"flor run {run_id}: {rel_script}"
        version = self._timed(
            "code", codeversion.commit_code, loc, message, exclude=exclude, max_file_bytes=self.max_file_bytes
        )
        self._timed(
            "store",
            store.insert,
            conn,
            "runs",
            {
                "run_id": run_id,
                "project": loc.project,
                "script": rel_script,
                "argv": list(sys.argv[1:]),
                "cwd": relative(Path.cwd(), loc.root),
                "started": self._clock(),
                "status": "running",
                "pid": os.getpid(),
                "host": socket.gethostname(),
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
                "checkpoint_root": ckpt_url,
                "left_out": dict(version.left_out) if version else None,
            },
        )

    def _close(self, status: str | None) -> None:
        session, self._session = self._session, None
        self.capture.stop()
        if session is None:
            return
        errors: list[BaseException] = []
        if session.checkpoints is not None:
            try:
                session.checkpoints.wait()
            except CheckpointError as err:  # the last checkpoint failed; the run itself is complete
                log.warning("flor: %s; the run's earlier checkpoints are intact", err)
        try:
            session.writer.close()
        except FlorError as err:
            errors.append(err)
        self._owns_run_until = None
        if status is not None and session.replay_id is None:
            store.update(session.conn, "runs", {"run_id": session.run_id}, {"status": status, "ended": self._clock()})
        session.conn.close()
        if errors:
            raise errors[0]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.capture.detach()
        self._close("finished" if self._owns_run_until is not None else None)

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

    # ---- capturing self.log ----------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.capture.batch_started(trainer, batch_idx)

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
        now = self._clock()
        if self._previous_epoch_start is not None:
            self._epoch_seconds = now - self._previous_epoch_start
        self._previous_epoch_start = now
        # Epoch 0 too: checkpoint -1 is the initial state, from which replay can re-train epoch 0.
        done = trainer.current_epoch - 1
        if self.checkpoint_every == AUTO:
            self._update_period()
        if self._due(done):
            self._checkpoint(trainer)
        self._epoch_started = self._clock()
        self._val_seconds = 0.0

    def _update_period(self) -> None:
        """With ``"auto"``: the period from the latest checkpoint's cost (the first write's is waited for)."""
        checkpoints = self._session.checkpoints if self._session else None
        if checkpoints is None:
            return
        if checkpoints.last_write_cpu_seconds is None:
            checkpoints.join()  # the first write's cost sets the period, so it is known before deciding
        self._period = schedule.next_period(
            self._period,
            write_cpu_seconds=checkpoints.last_write_cpu_seconds,
            snapshot_seconds=self._last_snapshot_seconds,
            epoch_seconds=self._epoch_seconds,
            budget=self.checkpoint_budget,
        )

    def _due(self, epoch: int) -> bool:
        """Whether the state at the end of ``epoch`` is to be checkpointed now and is not yet."""
        last = max(self._checkpoint_epochs, default=None)
        auto = self.checkpoint_every == AUTO
        return not self._checkpointed(epoch) and schedule.due(
            epoch, period=self._period, last_checkpointed=last, auto=auto
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._session is None and trainer.is_global_zero:
            self._session = self._open(trainer, pl_module, fitting=True)
        session = self._session
        if session is None or session.checkpoints is None:
            return
        row = store.fetch(session.conn, "SELECT settings FROM runs WHERE run_id = ?", [session.run_id])[0]
        settings = {**json.loads(row["settings"]), **data_sizes(trainer)}
        loggers = trackers.identities(trainer.loggers)  # what finds each logger's run again (replay writes there)
        store.update(session.conn, "runs", {"run_id": session.run_id}, {"settings": settings, "loggers": loggers})

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0 and not self._checkpointed(trainer.current_epoch - 1):
            self._checkpoint(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()
        if not trainer.sanity_checking:
            self._val_started = self._clock()
            if self._session is not None and self._session.checkpoints is not None:
                self._rng_at_validation = self._timed("rng", rng.capture)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.batches_ended()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.capture.epoch_ended(trainer, "validate")
        if not trainer.sanity_checking:
            self._val_seconds += self._clock() - self._val_started

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
            self._timed(
                "store",
                store.insert,
                session.conn,
                "epochs",
                {
                    "run_id": session.run_id,
                    "epoch": trainer.current_epoch,
                    "started": self._epoch_started,
                    "ended": self._clock(),
                    "val_seconds": self._val_seconds,
                },
            )

    def _checkpointed(self, epoch: int) -> bool:
        return epoch in self._checkpoint_epochs

    def _checkpoint(self, trainer: pl.Trainer) -> None:
        """Snapshot the state of the epoch just completed and write it in the background."""
        session = self._session
        if session is None or session.checkpoints is None:
            return
        state = self._timed("state", _lightning.dump_state, trainer)
        epoch, step = trainer.current_epoch - 1, trainer.global_step
        state["flor"] = {
            "run_id": session.run_id,
            "epoch": epoch,
            "rng": self._timed("rng", rng.capture),
            "rng_at_validation": self._rng_at_validation,
        }
        self._checkpoint_epochs.add(epoch)

        def index(info: CheckpointInfo) -> None:
            with session.lock:
                store.insert(
                    session.conn,
                    "checkpoints",
                    {
                        "run_id": session.run_id,
                        "epoch": info.epoch,
                        "step": info.step,
                        "path": info.path,
                        "sha256": info.sha256,
                        "size": info.size,
                        "write_seconds": info.write_seconds,
                        "created": self._clock(),
                    },
                )

        try:
            start = time.perf_counter()
            copy = snapshot(state)
            self._last_snapshot_seconds = time.perf_counter() - start
            self._snapshot_seconds += self._last_snapshot_seconds
            session.checkpoints.save(copy, session.run_id, epoch, step, index)
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
        c, s, w = self._checkpoints, self._seconds, self._log_writer
        return RecordStats(
            checkpoints_written=c.written if c else 0,
            checkpoint_bytes=c.bytes_written if c else 0,
            writer_cpu_seconds=c.writer_cpu_seconds if c else 0.0,
            blocked_seconds=c.blocked_seconds if c else 0.0,
            snapshot_seconds=self._snapshot_seconds,
            state_seconds=s["state"],
            rng_seconds=s["rng"],
            store_seconds=s["store"],
            code_seconds=s["code"],
            log_writer_cpu_seconds=w.cpu_seconds if w else 0.0,
            checkpoint_every=self._period,
        )


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
