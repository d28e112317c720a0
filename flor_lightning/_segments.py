"""A replay's segments: running this process's (:class:`SegmentRunner`), and the records they leave.

Each segment's status goes to ``replay_segments`` and each epoch it replayed to ``replay_epochs``;
:func:`wait_for_segments` reads them in the process that launched the ranks. A rank on another node
keeps them in a node store of its own (:mod:`._nodes`), which the launching rank merges as it waits.
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
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_warn

from flor_lightning import _drift as drift
from flor_lightning import _lightning, _nodes, _runs
from flor_lightning import _planner as planner
from flor_lightning import _replay_loggers as replay_loggers
from flor_lightning import _store as store
from flor_lightning._callback import FlorCallback
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import BadCheckpoint, CheckpointError, FlorError, ReplayError
from flor_lightning._nodes import NodeStore

if TYPE_CHECKING:
    import lightning.pytorch as pl

REPLAY_ID_ENV = "FLOR_REPLAY_ID"  # set while a replay runs: ranks the launcher starts join it

SHARED = (
    "replay_id",
    "run_id",
    "settings",
    "segments",
    "checkpoint_root",
    "checkpoints",
    "good",
    "retrain",
    "inside",
    "points",
)
"""What rank 0 decided and read from the project's store, handed to every rank as the ranks come up."""


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
        self.node_store: NodeStore | None = None  # a rank on another node: where its records go (set by adopt)

    def adopt(self, trainer: pl.Trainer, plan: dict[str, Any]) -> None:
        """Take rank 0's plan (:data:`SHARED`): its replay id, the run's records and its decisions, which
        a rank on another node could not read from a store of its own; such a rank then records into a
        :class:`NodeStore` (its FlorCallback too)."""
        for key in SHARED:
            setattr(self, key, plan[key])
        flor = flor_callback(trainer)
        flor.run_id, flor.replay_id = self.run_id, self.replay_id
        if trainer.node_rank > 0:
            url = _nodes.folder(self.checkpoint_root, self.run_id, self.replay_id)
            node = NodeStore(
                self.db_path, url, replay_id=self.replay_id, node=trainer.node_rank, rank=trainer.global_rank
            )
            self.node_store, self.db_path, flor.db_path = node, str(node.path), node.path

    def unreachable(self) -> str | None:
        """Why this rank cannot read the run's checkpoints (None: it can, or the run has none left to read):
        a node that does not share the launching node's storage."""
        good = [self.checkpoints[e]["path"] for e in sorted(self.good) if e in self.checkpoints]
        if not good:
            return None
        try:
            if CheckpointStore(self.checkpoint_root).exists(good[0]):
                return None
        except (OSError, FlorError) as err:
            return f"{type(err).__name__}: {err}"
        return f"{good[0]} is not there"

    def run(self, trainer: pl.Trainer, model: pl.LightningModule, **data: Any) -> None:
        flor = flor_callback(trainer)
        original_loop, sanity = trainer.fit_loop, trainer.num_sanity_val_steps
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        flor.run_id, flor.replay_id = self.run_id, self.replay_id
        # Replay re-derives values, not models: Lightning's checkpoint callbacks would write (and could
        # overwrite) model files the recording already made.
        trainer.callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]  # type: ignore[attr-defined]
        if trainer.world_size > 1:  # first of all as the ranks come up: before FlorCallback opens its session
            trainer.callbacks = [_SharePlan(self), *trainer.callbacks]  # type: ignore[attr-defined]
        sampler = _lightning.replay_data_unsharded(trainer, False)
        launched_env = os.environ.get(REPLAY_ID_ENV)
        if self.replay_id:  # ranks started by the launcher join this replay
            os.environ[REPLAY_ID_ENV] = self.replay_id
        own_loggers = replay_loggers.point_at_recording(
            trainer,
            db_path=self.db_path,
            run_id=self.run_id,
            replay_id=self.replay_id,
            enabled=self.loggers and trainer.node_rank == 0,  # Lightning's loggers write from rank 0 only
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
            flor.replay_id, flor.capture.muted, flor.capture.steps, flor.db_path = None, False, None, None
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
            raise segments_failed(self.replay_id, failed, self.total_segments, run_id=self.run_id) from err

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
                "node": trainer.node_rank if trainer.num_nodes > 1 else None,
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
        if self.node_store is not None:
            if status == "running":
                self.node_store.running(row)
            else:
                self.node_store.ended(row)


class _SharePlan(Callback):
    """Hands rank 0's plan to every rank in the first setup hook, when the process group is up and
    before FlorCallback opens its session with the replay id (:meth:`SegmentRunner.adopt`)."""

    def __init__(self, runner: SegmentRunner) -> None:
        self.runner = runner

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        mine = {key: getattr(self.runner, key) for key in SHARED}
        self.runner.adopt(trainer, trainer.strategy.broadcast(mine, src=0))
        # while the ranks can still answer each other: one that cannot read the checkpoints stops them all
        why = self.runner.unreachable() if trainer.node_rank > 0 else None
        if not trainer.strategy.reduce_boolean_decision(why is None, all=True):
            where = f"node {trainer.node_rank} cannot ({why})" if why else "a rank on another node cannot"
            raise ReplayError(
                f"replay {self.runner.replay_id}: {where} read the checkpoints of run {self.runner.run_id} at "
                f"{self.runner.checkpoint_root}; put them where every node reads them (shared storage, or "
                "FlorCallback(checkpoint_dir='s3://bucket/flor') with that fsspec package) and replay again"
            )


def wait_for_segments(
    db_path: str,
    replay_id: str,
    segments: int,
    *,
    run_id: str | None = None,
    nodes: str | None = None,
    stale: float | None = None,
    poll: float = 0.5,
    start_timeout: float = 600.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Block until every segment of ``replay_id`` finished; raise naming any that failed or died.

    A started segment is waited for as long as its process lives, however long its epochs take. A
    segment with no row ``start_timeout`` seconds into the wait never started: its process did not
    reach the replay. With ``nodes`` (:func:`._nodes.folder`), segments run on other nodes are read
    from the statuses they publish there, and each node store is merged into ``db_path`` as it
    appears; such a segment lives while its heartbeat goes on, and reads as dead after ``stale``
    seconds without one (:data:`._nodes.STALE_BEATS` heartbeats unless given).
    """
    stale = _nodes.STALE_BEATS * _nodes.heartbeat_seconds() if stale is None else stale
    deadline = clock() + start_timeout
    host = socket.gethostname()
    beats: dict[int, tuple[int, float]] = {}  # segment -> (its last heartbeat, when it was first seen)
    while True:
        remote = _nodes.statuses(nodes) if nodes else {}  # before the merge: a final status means its rows are up
        if nodes:
            _nodes.merge(db_path, nodes, replay_id, clock=time.time)
        with closing(store.connect(db_path)) as c:
            rows = {
                r["segment"]: r
                for r in store.fetch(c, "SELECT * FROM replay_segments WHERE replay_id = ?", [replay_id])
            }
        now = clock()
        for segment, row in remote.items():
            if segment not in rows:
                rows[segment] = _heard(row, beats, now, stale)
        failed = [r for r in rows.values() if _runs.status(r, host) in ("failed", "crashed")]
        if failed:
            raise segments_failed(replay_id, failed, segments, run_id=run_id)
        if len(rows) == segments and all(r["status"] == "finished" for r in rows.values()):
            return
        missing = sorted(set(range(segments)) - set(rows))
        if missing and now > deadline:
            raise never_started(replay_id, missing, rows, segments, start_timeout)
        sleep(poll)


def _heard(row: dict[str, Any], beats: dict[int, tuple[int, float]], now: float, stale: float) -> dict[str, Any]:
    """A segment's published status as a ``replay_segments`` row: failed once its heartbeat stopped for
    ``stale`` seconds (its process on another host cannot be asked)."""
    row = {**row, "pid": None, "host": None}  # another host's process: only its heartbeat says it lives
    if row["status"] != "running":
        return row
    seen = beats.get(row["segment"])
    if seen is None or seen[0] != row["beat"]:
        beats[row["segment"]] = (row["beat"], now)
    elif now - seen[1] > stale:
        row["status"] = "failed"
        row["error"] = (
            f"node {row['node']} sent no heartbeat for {stale:.0f}s: its process or the node died "
            f"(its values so far are in {row['store']})"
        )
    return row


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


def segments_failed(
    replay_id: str, failed: list[dict[str, Any]], segments: int, *, run_id: str | None = None
) -> ReplayError:
    """The error naming the failed segments (``replay_segments`` rows) and how to re-run them alone."""
    failed = sorted(failed, key=lambda r: r["segment"])
    detail = "; ".join(
        f"segment {r['segment']} (rank {r['rank']}"
        + (f", node {r['node']}" if r.get("node") is not None else "")
        + f"): {r['error'] or 'its process died'}"
        for r in failed
    )
    run = f"run={run_id!r}" if run_id else "run=..."
    return ReplayError(
        f"replay {replay_id}: {detail}. Its values so far are kept; re-run each alone with "
        f"trainer.replay(..., {run}, segment=<i>, segments={segments}) on one device where the project's log "
        f"store is, for i in {[r['segment'] for r in failed]}."
    )
