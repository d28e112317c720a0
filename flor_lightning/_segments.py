"""A replay's segments: running this process's (:class:`SegmentRunner`), and the records they leave.

Each segment's status goes to ``replay_segments`` and each epoch it replayed to ``replay_epochs``;
:func:`wait_for_segments` reads them in the process that launched the ranks.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn

from flor_lightning import _drift as drift
from flor_lightning import _lightning, _runs
from flor_lightning import _planner as planner
from flor_lightning import _replay_loggers as replay_loggers
from flor_lightning import _store as store
from flor_lightning._callback import FlorCallback
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import BadCheckpoint, CheckpointError, ReplayError

if TYPE_CHECKING:
    import lightning.pytorch as pl

REPLAY_ID_ENV = "FLOR_REPLAY_ID"  # set while a replay runs: ranks the launcher starts join it


def flor_callback(trainer: pl.Trainer) -> FlorCallback:
    """The FlorCallback among ``trainer.callbacks`` (``flor.Trainer`` or a plain Trainer given one)."""
    found = next((cb for cb in trainer.callbacks if isinstance(cb, FlorCallback)), None)  # type: ignore[attr-defined]
    if found is None:
        raise ReplayError(
            "this Trainer has no FlorCallback, so it cannot replay; "
            "use flor.Trainer or Trainer(callbacks=[flor.FlorCallback()]), as for the recording"
        )
    return found


class SegmentRunner:
    """Runs this process's replay segments with :class:`ReplayFitLoop` and keeps their records.

    Plain data only, so that a spawning strategy can pickle it to its ranks. Each process
    records its segment's status in ``replay_segments``: the process that launched the ranks
    learns from there whether every segment finished, since nothing held in a rank's memory
    comes back to it.
    """

    def __init__(
        self,
        *,
        db_path: str,
        replay_id: str,
        run: dict[str, Any],
        segments: list[planner.Segment],
        total_segments: int,
        checkpoint_root: str,
        checkpoints: dict[int, dict[str, Any]],
        good: set[int],
        retrain: bool,
        loggers: bool,
        clock: Callable[[], float],
        inside: dict[tuple[int, int], dict[str, Any]] | None = None,
        points: planner.Points | None = None,
    ) -> None:
        self.db_path = db_path
        self.replay_id = replay_id
        self.run_id: str = run["run_id"]
        self.settings: dict[str, Any] = json.loads(run["settings"] or "{}")
        self.segments = segments
        self.total_segments = total_segments
        self.checkpoint_root = checkpoint_root
        self.checkpoints = checkpoints
        self.good = set(good)
        self.retrain = retrain
        self.loggers = loggers  # write into the recorded run's TensorBoard/CSV/MLflow runs
        self.clock = clock
        self.inside = inside or {}  # checkpoints at validation points inside epochs, by (epoch, batch index)
        self.points = points  # where the replayed epochs validated inside (planner.validation_points)
        self._store: CheckpointStore | None = None
        self._unusable: dict[int, str] = {}  # epoch -> why its checkpoint could not be loaded
        self._segment: planner.Segment | None = None

    def run(self, trainer: pl.Trainer, model: pl.LightningModule, **data: Any) -> None:
        flor = flor_callback(trainer)
        original_loop, sanity = trainer.fit_loop, trainer.num_sanity_val_steps
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        flor.run_id, flor.replay_id = self.run_id, self.replay_id
        # Replay re-derives values, not models: Lightning's checkpoint callbacks would write (and could
        # overwrite) model files the recording already made.
        trainer.callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]  # type: ignore[attr-defined]
        sampler = _lightning.replay_data_unsharded(trainer, False)
        launched_env = os.environ.get(REPLAY_ID_ENV)
        os.environ[REPLAY_ID_ENV] = self.replay_id  # ranks started by the launcher join this replay
        own_loggers = replay_loggers.point_at_recording(
            trainer, db_path=self.db_path, run_id=self.run_id, replay_id=self.replay_id, enabled=self.loggers
        )
        try:
            if trainer.world_size > 1:
                self._run_fit(trainer, model, data, None)
            else:
                for seg in self.segments:
                    self._run_fit(trainer, model, data, seg)
        finally:
            trainer.fit_loop, trainer.num_sanity_val_steps = original_loop, sanity
            trainer.callbacks = callbacks  # type: ignore[attr-defined]
            trainer.loggers = own_loggers
            _lightning.replay_data_unsharded(trainer, sampler)
            flor.replay_id, flor.capture.muted, flor.capture.steps = None, False, None
            if launched_env is None:
                os.environ.pop(REPLAY_ID_ENV, None)

    def _run_fit(
        self, trainer: pl.Trainer, model: pl.LightningModule, data: dict[str, Any], segment: planner.Segment | None
    ) -> None:
        self._segment = segment
        trainer.fit_loop = _lightning.ReplayFitLoop(trainer, self)
        trainer.num_sanity_val_steps = 0
        forked = _lightning.forks_ranks(trainer)
        try:
            trainer.fit(model, **data)
        except BaseException as err:
            if forked:
                self._forked_ranks_failed(err)
            elif self._segment is not None:
                self._mark(trainer, "failed", error=f"{type(err).__name__}: {err}")
            raise
        if forked:  # fit returns once every forked rank exited, their values flushed: record their segments
            with closing(store.connect(self.db_path)) as c:
                running = {"replay_id": self.replay_id, "status": "running"}
                store.update(c, "replay_segments", running, {"status": "finished", "ended": self.clock()})
        else:
            self._mark(trainer, "finished")

    def _forked_ranks_failed(self, err: BaseException) -> None:
        """A rank forked by fit (ddp_fork) failed: record it on its segment, the others as stopped, and
        raise naming it (this process ran no segment; the launcher stopped the other ranks)."""
        rank = getattr(err, "error_index", None)  # torch.multiprocessing's ProcessRaisedException/ExitedException
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(err).__name__
        running, ended = {"replay_id": self.replay_id, "status": "running"}, self.clock()
        with closing(store.connect(self.db_path)) as c:
            store.update(
                c, "replay_segments", {**running, "rank": rank}, {"status": "failed", "ended": ended, "error": cause}
            )
            stopped = {"status": "failed", "ended": ended, "error": f"stopped when rank {rank} failed"}
            store.update(c, "replay_segments", running, stopped)
            failed = store.fetch(
                c, "SELECT * FROM replay_segments WHERE replay_id = ? AND status = 'failed'", [self.replay_id]
            )
        if failed and isinstance(err, Exception):
            raise segments_failed(self.replay_id, failed, self.total_segments) from err

    # ---- ReplayHooks ------------------------------------------------------------------------

    def steps(self, trainer: pl.Trainer) -> list[planner.EpochStep]:
        if self._segment is None:  # one segment per rank
            self._segment = self.segments[trainer.global_rank]
        return list(self._segment.steps)

    def load(self, epoch: int) -> dict[str, Any]:
        if self._store is None:
            self._store = CheckpointStore(self.checkpoint_root)
        row = self.checkpoints.get(epoch)
        if row is None or epoch not in self.good:
            raise BadCheckpoint(epoch, f"checkpoint of epoch {epoch} of run {self.run_id} is missing")
        try:
            return self._store.load(row["path"], row["sha256"])
        except CheckpointError as err:  # a missing or corrupt blob too: BlobError names the tensor
            self._unusable[epoch] = str(err)
            raise BadCheckpoint(epoch, str(err)) from err

    def load_inside(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        if self._store is None:
            self._store = CheckpointStore(self.checkpoint_root)
        row = self.inside.get((epoch, batch_idx))
        if row is None:
            raise CheckpointError(f"run {self.run_id} has no checkpoint inside epoch {epoch} after batch {batch_idx}")
        return self._store.load(row["path"], row["sha256"])

    def replan(self, bad_epoch: int, remaining: list[planner.EpochStep]) -> list[planner.EpochStep]:
        self.good.discard(bad_epoch)
        why = self._unusable.get(bad_epoch, "it is missing")
        rank_zero_warn(f"flor: checkpoint of epoch {bad_epoch} is unusable ({why}); re-planning from an earlier one")
        with closing(store.connect(self.db_path)) as c:
            row = {"replay_id": self.replay_id, "epoch": bad_epoch}
            store.insert(c, "replay_bad_checkpoints", row, replace=False)
        steps = planner.steps_for([s.epoch for s in remaining if s.wanted], self.good, train=self.retrain)
        keep = remaining[0].keep if remaining else None
        return [replace(s, keep=keep) for s in planner.with_points(steps, self.points)]

    def on_start(self, trainer: pl.Trainer) -> None:
        drift.check_like_recording(
            self.settings, batches=trainer.num_training_batches, max_epochs=trainer.max_epochs, retrain=self.retrain
        )
        threads = self.settings.get("torch_threads")
        if threads and threads != torch.get_num_threads():
            # e.g. Lightning's DDP on CPU gives each rank cpu_count // world_size threads; other thread
            # counts sum floats in another order (BatchNorm, reductions), and replay would not be exact
            torch.set_num_threads(threads)
        self._mark(trainer, "running")

    def on_step_start(self, trainer: pl.Trainer, step: planner.EpochStep) -> None:
        # An epoch trained only to reach a wanted one belongs to another segment: do not store it twice.
        capture = flor_callback(trainer).capture
        capture.muted = not step.wanted
        capture.steps = range(*step.keep) if step.keep is not None else None  # replay(steps=...): a slice

    def on_step_done(self, trainer: pl.Trainer, step: planner.EpochStep) -> None:
        capture = flor_callback(trainer).capture
        capture.muted, capture.steps = False, None
        if capture.partial:
            warnings.warn(  # by every rank: each knows only its own segment
                f"flor: {', '.join(sorted(capture.partial))} of epoch {step.epoch} not stored: replayed from a "
                "checkpoint inside the epoch, which holds no aggregate of it, it would cover only the batches from "
                "there; replay that epoch from its start (segments=1, epochs=) for it",
                stacklevel=2,
            )
            capture.partial.clear()
        with closing(store.connect(self.db_path)) as c:
            store.insert(
                c,
                "replay_epochs",
                {"replay_id": self.replay_id, "epoch": step.epoch, "action": step.action, "wanted": int(step.wanted)},
            )

    def _mark(self, trainer: pl.Trainer, status: str, error: str | None = None) -> None:
        seg = self._segment
        assert seg is not None
        with closing(store.connect(self.db_path)) as c:
            row = {
                "replay_id": self.replay_id,
                "segment": seg.index,
                "segments": self.total_segments,
                "rank": trainer.global_rank,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "status": status,
                "epochs": list(seg.epochs),
                "error": error,
            }
            if status == "running":
                store.insert(c, "replay_segments", {**row, "started": self.clock()})
            else:
                store.update(
                    c,
                    "replay_segments",
                    {"replay_id": self.replay_id, "segment": seg.index},
                    {"status": status, "ended": self.clock(), "error": error},
                )


def wait_for_segments(
    db_path: str,
    replay_id: str,
    segments: int,
    *,
    poll: float = 0.5,
    start_timeout: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until every segment of ``replay_id`` finished; raise naming any that failed or died.

    A started segment is waited for as long as its process lives (on another host it is taken
    to live: only its row can say it ended), however long its epochs take. A segment with no row
    ``start_timeout`` seconds into the wait never started: its process did not reach the replay.
    """
    deadline = clock() + start_timeout
    host = socket.gethostname()
    while True:
        with closing(store.connect(db_path)) as c:
            rows = {
                r["segment"]: r
                for r in store.fetch(c, "SELECT * FROM replay_segments WHERE replay_id = ?", [replay_id])
            }
        failed = [r for r in rows.values() if _runs.status(r, host) in ("failed", "crashed")]
        if failed:
            raise segments_failed(replay_id, failed, segments)
        if len(rows) == segments and all(r["status"] == "finished" for r in rows.values()):
            return
        missing = sorted(set(range(segments)) - set(rows))
        if missing and clock() > deadline:
            raise never_started(replay_id, missing, rows, segments, start_timeout)
        sleep(poll)


def never_started(
    replay_id: str, missing: list[int], rows: dict[int, dict[str, Any]], segments: int, waited: float
) -> ReplayError:
    """The error naming the segments that never started, and what the others are doing."""
    running = sorted(i for i, r in rows.items() if r["status"] == "running")
    finished = sorted(i for i, r in rows.items() if r["status"] == "finished")
    states = ((running, "are still running"), (finished, "finished"))
    others = "; ".join(f"segments {which} {state}" for which, state in states if which)
    return ReplayError(
        f"replay {replay_id}: segments {missing} never started within {waited:.0f}s"
        + (f" ({others})" if others else "")
        + f"; their ranks' processes did not reach the replay: read their output, then replay each alone with "
        f"trainer.replay(..., run=..., segment=<i>, segments={segments}) on one device."
    )


def segments_failed(replay_id: str, failed: list[dict[str, Any]], segments: int) -> ReplayError:
    """The error naming the failed segments (``replay_segments`` rows) and how to re-run one."""
    detail = "; ".join(
        f"segment {r['segment']} (rank {r['rank']}): {r['error'] or 'its process died'}"
        for r in sorted(failed, key=lambda r: r["segment"])
    )
    return ReplayError(
        f"replay {replay_id}: {detail}. Its values so far are kept; re-run it alone with "
        f"trainer.replay(..., run=..., segment=<i>, segments={segments}) on one device."
    )
