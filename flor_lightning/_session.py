"""The run session: what one fit, validate, test or replay call records into, from opening to closing.

A session holds the store connection, the run's log writer and checkpoint store, and the lock
under which the training thread and the checkpoint writer share the connection. It writes the
run's row (a new run, or a resumed one reopened), each epoch's row and each checkpoint's index
row, and the run's status as it closes. It knows nothing of Lightning: the callback gathers what
goes into the rows (:mod:`flor_lightning._metadata`) and hands it over. The clock is injected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointInfo, CheckpointStore
from flor_lightning._errors import CheckpointError, FlorError
from flor_lightning._locate import Location, ignore_flor_folder, process_local
from flor_lightning._metadata import new_run_id
from flor_lightning._runs import Status

log = logging.getLogger(__name__)

NewRun = Callable[[str, str | None], dict[str, Any]]
"""Gives the ``runs`` row of a new run from its id and checkpoint root URL (None: no checkpoints)."""

ResumeFrom = tuple[str, int] | tuple[str, int, int, int]
"""Where a resumed fit continues run ``[0]``: after its epoch ``[1]``, or inside epoch ``[1]`` after its
training batch ``[2]``, at global step ``[3]`` (a checkpoint taken inside the epoch)."""


class RunSession:
    """The records of one fit, validate, test or replay call; open it with :meth:`open`.

    Attributes:
        run_id: the run the values go to.
        replay_id: the replay they belong to (None while recording).
        conn: the store connection of the training thread (shared, under ``lock``, with the checkpoint writer).
        writer: the background writer of the logged values.
        checkpoints: the run's checkpoint store; None unless this is a recorded fit.
        checkpointed: epochs with a checkpoint (written, in flight, or tried and failed).
        owns_run: this session opened (or reopened) the run's row: the run ends with it.
        store_seconds: training-thread time spent writing the run's row and the epochs' rows.
        epoch_seconds: wall time from the start of the epoch before the latest to the latest's (0 before two).
        last_step: the global step of the latest checkpoint taken (None before any in this session).
    """

    def __init__(
        self,
        *,
        run_id: str,
        replay_id: str | None,
        conn: sqlite3.Connection,
        writer: store.LogWriter,
        checkpoints: CheckpointStore | None,
        checkpointed: set[int],
        owns_run: bool,
        clock: Callable[[], float],
        store_seconds: float = 0.0,
    ) -> None:
        self.run_id = run_id
        self.replay_id = replay_id
        self.conn = conn
        self.writer = writer
        self.checkpoints = checkpoints
        self.checkpointed = checkpointed
        self.owns_run = owns_run
        self.store_seconds = store_seconds
        self.epoch_seconds = 0.0
        self.last_step: int | None = None
        self.lock = threading.Lock()
        self._clock = clock
        self._epoch_starting: float | None = None
        self._epoch_started = 0.0
        self._val_started = 0.0
        self._val_seconds = 0.0

    @classmethod
    def open(
        cls,
        loc: Location,
        *,
        run_id: str | None,
        replay_id: str | None,
        checkpoints: CheckpointStore | None,
        resume_from: ResumeFrom | None,
        new_run: NewRun,
        flush_interval: float,
        clock: Callable[[], float],
    ) -> RunSession:
        """Open the session of a recorded fit (``checkpoints`` given), or of a validate, test or replay call.

        A fit records a new run, or continues run ``resume_from[0]`` after its epoch ``resume_from[1]`` (or
        inside it: :data:`ResumeFrom`) where this store holds that run
        (``fit(ckpt_path=flor.last_checkpoint(run))``). A validate or test call without ``run_id`` records a run
        of its own; with one (after a fit, or a replay's) its values go to that run, whose row is left alone.
        ``new_run`` gives a new run's row: it is called (and may commit the code) only once the store and the
        checkpoint folder are known writable.

        Raises:
            StoreError: the store is damaged, or read-only where a run is to be written.
            ConfigError: the checkpoint folder cannot be written.
        """
        writes_run = False
        if checkpoints is not None or run_id is None:  # a fit, or validate/test with no run before it
            writes_run, run_id = True, new_run_id(clock())
        conn = store.connect(loc.db_path)  # a damaged store or one under a file fails here, before any folder
        try:
            if writes_run:  # a run is about to be written: read-only or damaged stops it here
                store.check_writable(conn, loc.db_path)
            ignore_flor_folder(loc.db_path.parent)
            if checkpoints is not None:
                checkpoints.check_writable(f"{checkpoints.root}/{run_id}")  # before anything is written
                _warn_if_process_local(checkpoints)
            resumed = (
                resume_from if checkpoints is not None and resume_from and run_exists(conn, resume_from[0]) else None
            )
            checkpointed: set[int] = set()
            seconds = 0.0
            if resumed is not None:  # continue that run's records
                run_id, epoch = resumed[0], resumed[1]
                reopen_run(conn, run_id, epoch, inside=(resumed[2], resumed[3]) if len(resumed) == 4 else None)
                checkpoints = CheckpointStore(recorded_checkpoint_root(conn, run_id))
                checkpointed = recorded_checkpoints(conn, run_id)
            elif writes_run:
                row = {**new_run(run_id, checkpoints.url if checkpoints else None), "started": clock()}
                row.update(status="running", pid=os.getpid(), host=socket.gethostname())
                start = time.perf_counter()
                store.insert(conn, "runs", row)
                seconds = time.perf_counter() - start
        except BaseException:
            conn.close()
            raise
        writer = store.LogWriter(lambda: store.connect(loc.db_path), interval=flush_interval)
        return cls(
            run_id=run_id,
            replay_id=replay_id,
            conn=conn,
            writer=writer,
            checkpoints=checkpoints,
            checkpointed=checkpointed,
            owns_run=resumed is not None or writes_run,
            clock=clock,
            store_seconds=seconds,
        )

    # ---- the run's row ---------------------------------------------------------------------------

    def add_settings(self, settings: dict[str, Any], loggers: list[dict[str, Any]]) -> None:
        """Merge ``settings`` into the run's (what is known only once the fit loop has set up its data)
        and record the loggers' runs (``loggers``: what finds each one again)."""
        with self.lock:
            (row,) = store.fetch(self.conn, "SELECT settings FROM runs WHERE run_id = ?", [self.run_id])
            merged = {**json.loads(row["settings"]), **settings}
            store.update(self.conn, "runs", {"run_id": self.run_id}, {"settings": merged, "loggers": loggers})

    # ---- epochs ----------------------------------------------------------------------------------

    def epoch_starting(self) -> None:
        """An epoch starts, before the checkpoint of the one before it: ``epoch_seconds`` is the time
        since the previous one started (its checkpoint included)."""
        now = self._clock()
        if self._epoch_starting is not None:
            self.epoch_seconds = now - self._epoch_starting
        self._epoch_starting = now

    def epoch_started(self) -> None:
        """The epoch's own time starts now: its row leaves out the checkpoint taken as it began."""
        self._epoch_started = self._clock()
        self._val_seconds = 0.0

    def validation_started(self) -> None:
        self._val_started = self._clock()

    def validation_ended(self) -> None:
        self._val_seconds += self._clock() - self._val_started

    def write_epoch(self, epoch: int) -> None:
        """The row of ``epoch``, just ended: its start, end and the time its validations took."""
        start = time.perf_counter()
        row = {
            "run_id": self.run_id,
            "epoch": epoch,
            "started": self._epoch_started,
            "ended": self._clock(),
            "val_seconds": self._val_seconds,
        }
        with self.lock:
            store.insert(self.conn, "epochs", row)
        self.store_seconds += time.perf_counter() - start

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(
        self, state: Any, epoch: int, step: int, *, batch_idx: int | None = None, moment: str | None = None
    ) -> None:
        """Write ``state`` (a :meth:`~flor_lightning._checkpoints.CheckpointStore.snapshot`) as the checkpoint
        of the end of ``epoch``, or of global ``step`` inside it after its training batch ``batch_idx`` (at ``moment``:
        ``"validation_end"`` or ``"train_batch_end"``), in the background; it is indexed once it is complete.

        Raises:
            CheckpointError: an earlier write failed, or this is not a recorded fit.
        """
        if self.checkpoints is None:
            raise CheckpointError(f"the session of run {self.run_id} does not checkpoint (it is no recorded fit)")

        def index(info: CheckpointInfo) -> None:  # on the writer thread
            if batch_idx is not None:  # a resume from it keeps the values logged before it: they are stored first
                self.writer.flush()
            row = {
                "run_id": self.run_id,
                "epoch": info.epoch,
                "step": info.step,
                "batch_idx": batch_idx,
                "moment": moment,
                "path": info.path,
                "sha256": info.sha256,
                "size": info.size,
                "write_seconds": info.write_seconds,
                "created": self._clock(),
                "format": info.format,
                "packs": list(info.packs),
            }
            with self.lock:
                store.insert(self.conn, "checkpoints", row)

        self.last_step = step
        self.checkpoints.save(state, self.run_id, epoch, step, index, batch_idx=batch_idx)

    # ---- closing ---------------------------------------------------------------------------------

    def close(self, status: Status | None) -> None:
        """Wait for the last checkpoint, write what is still queued, set the run's ``status`` (None:
        leave it as it is; a replay never changes the run's) and close the connection.

        Raises:
            StoreError: the log writer failed; everything is closed all the same.
        """
        errors: list[BaseException] = []
        if self.checkpoints is not None:
            self.checkpoints.unwatch()
            try:
                self.checkpoints.wait()
            except CheckpointError as err:  # the last checkpoint failed; the run itself is complete
                log.warning("flor: %s; the run's earlier checkpoints are intact", err)
        try:
            self.writer.close()
        except FlorError as err:
            errors.append(err)
        if status is not None and self.replay_id is None:
            with self.lock:
                store.update(self.conn, "runs", {"run_id": self.run_id}, {"status": status, "ended": self._clock()})
        self.conn.close()
        if errors:
            raise errors[0]


# ---- resuming a run ------------------------------------------------------------------------------


def run_exists(conn: sqlite3.Connection, run_id: str) -> bool:
    """Whether this log store recorded ``run_id`` (a checkpoint may come from another project)."""
    return conn.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone() is not None


def reopen_run(conn: sqlite3.Connection, run_id: str, epoch: int, *, inside: tuple[int, int] | None = None) -> None:
    """Mark ``run_id`` running in this process again and drop what it recorded after ``epoch``, or, with
    ``inside=(batch_idx, step)``, after training batch ``batch_idx`` (global step ``step``) of ``epoch``.

    The values, timings and checkpoints of what follows belong to the trajectory being replaced;
    the resumed run logs them again. Inside an epoch, what follows is that epoch's later training
    batches, its training aggregates and the validations at later steps.
    """
    with store.immediate(conn):
        conn.execute("DELETE FROM logs WHERE run_id = ? AND replay_id IS NULL AND epoch > ?", [run_id, epoch])
        conn.execute("DELETE FROM epochs WHERE run_id = ? AND epoch > ?", [run_id, epoch])
        conn.execute("DELETE FROM checkpoints WHERE run_id = ? AND epoch > ?", [run_id, epoch])
        if inside is not None:
            batch_idx, step = inside
            conn.execute(
                "DELETE FROM logs WHERE run_id = ? AND replay_id IS NULL AND epoch = ? AND ("
                "(stage = 'train' AND (batch_idx > ? OR level = 'epoch')) OR (stage = 'validate' AND step > ?))",
                [run_id, epoch, batch_idx, step],
            )
            conn.execute("DELETE FROM epochs WHERE run_id = ? AND epoch = ?", [run_id, epoch])
            conn.execute(
                "DELETE FROM checkpoints WHERE run_id = ? AND epoch = ? AND (batch_idx IS NULL OR batch_idx > ?)",
                [run_id, epoch, batch_idx],
            )
        conn.execute(
            "UPDATE runs SET status = 'running', ended = NULL, pid = ?, host = ? WHERE run_id = ?",
            [os.getpid(), socket.gethostname(), run_id],
        )


def recorded_checkpoints(conn: sqlite3.Connection, run_id: str) -> set[int]:
    """Epochs of ``run_id`` that already have a checkpoint at their end."""
    rows = conn.execute("SELECT epoch FROM checkpoints WHERE run_id = ? AND batch_idx IS NULL", [run_id])
    return {int(r[0]) for r in rows}


def recorded_checkpoint_root(conn: sqlite3.Connection, run_id: str) -> str:
    """Where ``run_id`` keeps its checkpoints (its row's ``checkpoint_root``)."""
    (row,) = store.fetch(conn, "SELECT checkpoint_root FROM runs WHERE run_id = ?", [run_id])
    return str(row["checkpoint_root"])


def _warn_if_process_local(checkpoints: CheckpointStore) -> None:
    if process_local(checkpoints.fs):
        log.warning(
            "flor: checkpoints go to %s, which lives in this process's memory: they vanish when it exits, "
            "and a replay in another process re-trains instead of restoring. Use a folder or an object "
            "store (FlorCallback(checkpoint_dir=...) or FLOR_HOME) to keep them",
            checkpoints.url,
        )
