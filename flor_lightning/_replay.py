"""Replay: run a recorded run again from its checkpoints, storing what the new code logs."""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flor_lightning import _codecheck as codecheck
from flor_lightning import _codeversion as codeversion
from flor_lightning import _lightning, _runs
from flor_lightning import _planner as planner
from flor_lightning import _replay_loggers as replay_loggers
from flor_lightning import _shadow as shadow
from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import BadCheckpoint, CheckpointError, FlorError, ReplayError
from flor_lightning._locate import Location, locate, process_local, script
from flor_lightning._metadata import hyperparameters

if TYPE_CHECKING:
    import sqlite3

    import lightning.pytorch as pl


@dataclass
class ReplayReport:
    """What a replay did and how faithfully it reproduced the recording.

    ``rederived`` counts values that were recorded and logged again; ``matched`` those equal
    bit for bit (NaN matches NaN); ``max_difference`` is the largest absolute difference
    among the mismatched numeric ones. ``new_values`` counts values of names the recording
    did not have at that point (the hindsight metrics).
    """

    replay_id: str
    run_id: str
    train: bool
    reason: str
    epochs_restored: list[int] = field(default_factory=list)
    epochs_trained: list[int] = field(default_factory=list)
    rederived: int = 0
    matched: int = 0
    mismatched: int = 0
    max_difference: float = 0.0
    mismatched_names: list[str] = field(default_factory=list)
    new_values: int = 0
    new_names: list[str] = field(default_factory=list)
    bad_checkpoints: list[int] = field(default_factory=list)
    seconds: float = 0.0
    status: str = "finished"
    error: str | None = None
    replaced_values: int = 0
    replaced_replays: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        ended = (
            f"finished in {self.seconds:.1f}s"
            if self.status == "finished"
            else f"{self.status} after {self.seconds:.1f}s ({(self.error or '?').splitlines()[0]}); before that it did"
        )
        lines = [
            f"flor replay {self.replay_id} of run {self.run_id} {ended}",
            f"  epochs restored: {planner.describe(self.epochs_restored) or '-'}; "
            f"re-trained: {planner.describe(self.epochs_trained) or '-'}",
            f"  new values: {self.new_values} ({', '.join(self.new_names) or 'no new names'})",
            f"  recorded values re-derived: {self.rederived}, matched: {self.matched}, "
            f"mismatched: {self.mismatched}"
            + (
                f" (largest difference {self.max_difference:.3g} in {', '.join(self.mismatched_names)})"
                if self.mismatched
                else ""
            ),
        ]
        if self.bad_checkpoints:
            lines.append(f"  checkpoints that failed their checksum and were worked around: {self.bad_checkpoints}")
        if self.replaced_values:
            lines.append(
                f"  replaced {self.replaced_values} values of unfinished replay(s) {', '.join(self.replaced_replays)} "
                "at the epochs and names this one logged again"
            )
        return "\n".join(lines)


def find_run(conn: sqlite3.Connection, run: str | None, script: str | None) -> dict[str, Any]:
    """The run to replay: ``run`` if given, else the latest run of ``script`` that has checkpoints."""
    if run is not None:
        return _runs.get_run(conn, run)
    rows = store.fetch(
        conn,
        "SELECT * FROM runs WHERE script IS ? AND run_id IN (SELECT run_id FROM checkpoints) "
        "ORDER BY started DESC LIMIT 1",
        [script],
    ) or store.fetch(  # none left (flor gc freed them): the latest run with a finished epoch, re-trained
        conn,
        "SELECT * FROM runs WHERE script IS ? AND run_id IN (SELECT run_id FROM epochs) ORDER BY started DESC LIMIT 1",
        [script],
    )
    if not rows:
        raise ReplayError(
            f"no recorded run of {script!r} with checkpoints in this project. Record one first with "
            "flor.Trainer(...).fit(...), or pass run='<id>' (flor.runs() lists the recorded runs)."
        )
    return rows[0]


def decide_training(
    trainer: pl.Trainer, model: pl.LightningModule, run: dict[str, Any], loc: Location
) -> tuple[bool, str]:
    """Whether new logging sits on the training path, by comparing code with the recorded version."""
    settings = json.loads(run["settings"] or "{}")
    if settings.get("val_check_interval", 1.0) not in (1.0, None):
        return True, "validation ran inside the epoch (val_check_interval), which checkpoints cannot reproduce"
    if not run["shadow_commit"] or not loc.in_git:
        return False, "the run has no code snapshot to compare with; restoring (pass train=True to re-train)"
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    users = [model, *(cb for cb in callbacks if codecheck.defined_in_project(type(cb), loc.root))]
    current = codecheck.user_methods(users, loc.root)

    def recorded(file: Path) -> str | None:
        return shadow.read_file(loc.root, run["shadow_commit"], file.relative_to(loc.root).as_posix())

    changed = codecheck.changed_training_path(current, recorded)
    if changed:
        return True, f"the training path changed since the recording: {', '.join(changed)}"
    return False, "the training path is unchanged since the recording; only validation and epoch-end hooks run"


def run_replay(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    *,
    datamodule: Any,
    train_dataloaders: Any,
    val_dataloaders: Any,
    run: str | None,
    epochs: Sequence[int] | range | None,
    segments: int,
    segment: int | None,
    train: bool | None,
    loggers: bool = True,
) -> ReplayReport:
    """See :meth:`flor_lightning.Trainer.replay`."""
    _check_arguments(trainer.world_size, segments, segment, train)
    planner.validate_epochs(epochs)
    if trainer.world_size > 1 and _lightning.spawns_ranks(trainer):
        raise ReplayError(
            "multi-process replay runs with strategy='ddp' (each rank re-runs your script) or 'ddp_fork' (ranks "
            "forked from this process), not with a spawning strategy such as 'ddp_spawn'; or replay one segment "
            "per single-device process with segment=i"
        )
    loc = locate()
    rec, ckpt_rows, timings = _load_run(loc, run)
    if not rec["checkpoint_root"]:
        raise ReplayError(f"run {rec['run_id']} has no checkpoint location recorded; it cannot be replayed")
    ckpts = CheckpointStore(rec["checkpoint_root"])
    missing = sorted(e for e, r in ckpt_rows.items() if not ckpts.exists(r["path"]))
    good = {e for e in ckpt_rows if e not in missing}
    recorded_epochs = [t["epoch"] for t in timings] or sorted(e for e in ckpt_rows if e >= 0)
    wanted = planner.epoch_list(epochs, recorded_epochs)
    if train is None:
        retrain, reason = decide_training(trainer, model, rec, loc)
    else:
        retrain, reason = train, f"train={train} was given"
    train_s = {t["epoch"]: t["ended"] - t["started"] - t["val_seconds"] for t in timings}
    val_s = {t["epoch"]: t["val_seconds"] for t in timings}
    cost = {e: val_s.get(e, 0.0) + (train_s.get(e, 0.0) if retrain else 0.0) for e in wanted}
    # each segment starts with the model as passed in (so it may re-train from the start), unless one
    # process runs several segments one after the other
    scratch = segments == 1 or segment is not None or trainer.world_size > 1
    plan = planner.plan_segments(wanted, good, train=retrain, segments=segments, cost=cost, scratch=scratch)
    chosen = plan if segment is None else [plan[segment]]
    replay_id = os.environ.get(REPLAY_ID_ENV) or f"{rec['run_id']}.r{uuid.uuid4().hex[:6]}"
    report = ReplayReport(replay_id=replay_id, run_id=rec["run_id"], train=retrain, reason=reason)
    primary, world = trainer.global_rank == 0, trainer.world_size
    started = time.time()
    if primary:
        _warn_missing(rec, ckpt_rows, missing, ckpts)
        _warn_hparams(rec, model, datamodule or train_dataloaders)
        _announce(rec["run_id"], chosen, segment, segments, retrain, reason, train_s, val_s, ckpt_rows)
        exclude = codeversion.run_exclusions(loc, trainer, rec["checkpoint_root"])
        version = codeversion.commit_code(loc, f"flor replay {replay_id} of run {rec['run_id']}", exclude=exclude)
        with closing(store.connect(loc.db_path)) as c:
            store.insert(
                c,
                "replays",
                {
                    "replay_id": replay_id,
                    "run_id": rec["run_id"],
                    "started": started,
                    "status": "running",
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "shadow_commit": version.shadow_commit if version else None,
                    "plan": [[asdict(st) for st in seg.steps] for seg in chosen],
                },
                replace=False,
            )
    runner = SegmentRunner(
        db_path=str(loc.db_path),
        replay_id=replay_id,
        run=rec,
        segments=chosen,
        total_segments=segments,
        checkpoint_root=rec["checkpoint_root"],
        checkpoints=ckpt_rows,
        good=good,
        retrain=retrain,
        loggers=loggers,
    )
    report.status = "failed"
    try:
        runner.run(
            trainer, model, datamodule=datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders
        )
        if primary and world > 1:
            wait_for_segments(str(loc.db_path), replay_id, segments)
        report.status = "finished"
    except BaseException as err:
        report.error = _cause(err)
        raise
    finally:
        report.seconds = time.time() - started
        _store_report(loc, report, primary=primary)
    rank_zero_info(str(report))
    return report


def _cause(err: BaseException) -> str:
    if isinstance(err, SystemExit):  # Lightning turns Ctrl-C (KeyboardInterrupt) into sys.exit(1)
        return f"interrupted: SystemExit({err.code}), as Lightning exits on Ctrl-C"
    return f"{type(err).__name__}: {err}".strip()


def _store_report(loc: Location, report: ReplayReport, *, primary: bool) -> None:
    """Fill in what the replay did, finished or not, and store it with its status (the primary rank).

    A finished replay replaces the values of unfinished ones it repeats. When the replay failed, trouble
    writing its record is only warned about: the replay's own error is the one raised.
    """
    try:
        with closing(store.connect(loc.db_path)) as c:
            _fill_epochs(c, report)
            if primary:
                _compare(c, report)
                if report.status == "finished":
                    _replace_unfinished(c, report)
                row = {"status": report.status, "ended": time.time(), "report": asdict(report)}
                store.update(c, "replays", {"replay_id": report.replay_id}, row)
    except FlorError as err:
        if report.status == "finished":
            raise
        rank_zero_warn(f"flor: could not store the report of the failed replay {report.replay_id}: {err}")
    if report.status != "finished" and primary:
        rank_zero_warn(f"flor: {report}")  # what it did before it failed, as stored


REPLAY_ID_ENV = "FLOR_REPLAY_ID"


def _warn_missing(
    rec: dict[str, Any], ckpt_rows: dict[int, dict[str, Any]], missing: list[int], ckpts: CheckpointStore
) -> None:
    """Say which checkpoints are gone, where they were expected, and what the replay does instead."""
    where = f"{rec['checkpoint_root']}/{rec['run_id']}"
    if len(missing) < len(ckpt_rows):
        if missing:
            rank_zero_warn(
                f"flor: checkpoints of epochs {missing} of run {rec['run_id']} are missing from {where}; "
                "replay re-trains around them from the nearest earlier one"
            )
        return
    if not ckpt_rows:
        why = "flor gc freed them (or the run was killed before its first one)"
    elif process_local(ckpts.fs):
        why = f"they were kept in {ckpts.url}, the memory of the recording process, and went with it"
    else:
        why = "their files are gone (was FLOR_HOME moved or deleted?)"
    rank_zero_warn(
        f"flor: run {rec['run_id']} has no checkpoint left to restore from: {why}; expected under {where}. "
        "Replay re-trains from the model you pass, as a new fit would: its values match the recording only if "
        "the model, data and seed are set up as they were for it"
    )


def changed_hparams(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name=now (recorded was)`` for each hyperparameter that differs (compared as stored: through JSON)."""
    now = json.loads(json.dumps(current, default=repr))
    return [
        f"{k}={now.get(k, '(none)')!r} (recorded {recorded.get(k, '(none)')!r})"
        for k in sorted(set(recorded) | set(now))
        if recorded.get(k, "(none)") != now.get(k, "(none)")
    ]


def _warn_hparams(rec: dict[str, Any], model: pl.LightningModule, datamodule: Any) -> None:
    changed = changed_hparams(json.loads(rec["hparams"] or "{}"), hyperparameters(model, None, datamodule))
    if changed:
        rank_zero_warn(
            f"flor: the hyperparameters differ from run {rec['run_id']}'s recording: {', '.join(changed)}. "
            f"The replay reproduces it only with the recorded ones (`flor show {rec['run_id']}` lists them)"
        )


def _check_arguments(world: int, segments: int, segment: int | None, train: bool | None) -> None:
    planner.validate_segment_args(segments, segment)
    if train not in (None, True, False):
        raise ReplayError(f"train must be None (decide automatically), True or False, got {train!r}")
    if world > 1 and segment is not None:
        raise ReplayError(
            f"segment={segment} runs one segment in a single-device process, but this Trainer starts {world} "
            f"processes; use segments={world} (one segment per rank) or devices=1 with segment=i"
        )
    if world > 1 and segments != world:
        raise ReplayError(
            f"segments={segments} but this Trainer runs {world} processes (devices x num_nodes); multi-process "
            f"replay runs one segment per rank: pass segments={world}"
        )


def _load_run(loc: Location, run: str | None) -> tuple[dict[str, Any], dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The run to replay, its checkpoint index by epoch, and its epoch timings."""
    if not loc.db_path.exists():
        raise ReplayError(
            f"nothing to replay: no flor log store at {str(loc.db_path)!r}. Record a run first with "
            "flor.Trainer(...).fit(...) from this project."
        )
    with closing(store.connect(loc.db_path)) as conn:
        store.check_writable(conn, loc.db_path)  # read-only or damaged: refused before the code snapshot
        rec = find_run(conn, run, script(loc))
        rows = store.fetch(conn, "SELECT * FROM checkpoints WHERE run_id = ?", [rec["run_id"]])
        timings = store.fetch(conn, "SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", [rec["run_id"]])
    return rec, {r["epoch"]: r for r in rows}, timings


def _announce(
    run_id: str,
    chosen: list[planner.Segment],
    segment: int | None,
    segments: int,
    retrain: bool,
    reason: str,
    train_s: dict[int, float],
    val_s: dict[int, float],
    ckpt_rows: dict[int, dict[str, Any]],
) -> None:
    steps = [s for seg in chosen for s in seg.steps]
    load_s = max((r["write_seconds"] for r in ckpt_rows.values()), default=0.0)
    estimate = planner.estimate_seconds(steps, train_s, val_s, load_s)
    if segments > 1 and segment is None:
        estimate = max(planner.estimate_seconds(seg.steps, train_s, val_s, load_s) for seg in chosen)
    full = sum(train_s.values()) + sum(val_s.values())
    which = (
        f" (segment {segment} of {segments})"
        if segment is not None
        else (f" in {segments} segments" if segments > 1 else "")
    )
    rank_zero_info(
        f"flor: replaying run {run_id} epochs {planner.describe([e for s in chosen for e in s.epochs])}{which}: "
        f"{'re-training' if retrain else 'restoring checkpoints'} because {reason}. "
        f"Estimated {estimate:.1f}s (the recording took {full:.1f}s)."
    )


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
        loggers: bool = True,
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
        self._store: CheckpointStore | None = None
        self._segment: planner.Segment | None = None

    def run(self, trainer: pl.Trainer, model: pl.LightningModule, **data: Any) -> None:
        flor = trainer.flor  # type: ignore[attr-defined]
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
            flor.replay_id, flor.capture.muted = None, False
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
                store.update(c, "replay_segments", running, {"status": "finished", "ended": time.time()})
        else:
            self._mark(trainer, "finished")

    def _forked_ranks_failed(self, err: BaseException) -> None:
        """A rank forked by fit (ddp_fork) failed: record it on its segment, the others as stopped, and
        raise naming it (this process ran no segment; the launcher stopped the other ranks)."""
        rank = getattr(err, "error_index", None)  # torch.multiprocessing's ProcessRaisedException/ExitedException
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(err).__name__
        running, ended = {"replay_id": self.replay_id, "status": "running"}, time.time()
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
        except CheckpointError as err:
            raise BadCheckpoint(epoch, str(err)) from err

    def replan(self, bad_epoch: int, remaining: list[planner.EpochStep]) -> list[planner.EpochStep]:
        self.good.discard(bad_epoch)
        rank_zero_warn(f"flor: checkpoint of epoch {bad_epoch} is unusable; re-planning from an earlier one")
        with closing(store.connect(self.db_path)) as c:
            row = {"replay_id": self.replay_id, "epoch": bad_epoch}
            store.insert(c, "replay_bad_checkpoints", row, replace=False)
        return planner.steps_for([s.epoch for s in remaining if s.wanted], self.good, train=self.retrain)

    def on_start(self, trainer: pl.Trainer) -> None:
        _check_like_recording(trainer, self.settings, self.retrain)
        threads = self.settings.get("torch_threads")
        if threads and threads != torch.get_num_threads():
            # e.g. Lightning's DDP on CPU gives each rank cpu_count // world_size threads; other thread
            # counts sum floats in another order (BatchNorm, reductions), and replay would not be exact
            torch.set_num_threads(threads)
        self._mark(trainer, "running")

    def on_step_start(self, trainer: pl.Trainer, step: planner.EpochStep) -> None:
        # An epoch trained only to reach a wanted one belongs to another segment: do not store it twice.
        trainer.flor.capture.muted = not step.wanted  # type: ignore[attr-defined]

    def on_step_done(self, trainer: pl.Trainer, step: planner.EpochStep) -> None:
        trainer.flor.capture.muted = False  # type: ignore[attr-defined]
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
                store.insert(c, "replay_segments", {**row, "started": time.time()})
            else:
                store.update(
                    c,
                    "replay_segments",
                    {"replay_id": self.replay_id, "segment": seg.index},
                    {"status": status, "ended": time.time(), "error": error},
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


def _fill_epochs(conn: sqlite3.Connection, report: ReplayReport) -> None:
    done = store.fetch(
        conn, "SELECT DISTINCT epoch, action FROM replay_epochs WHERE replay_id = ? ORDER BY epoch", [report.replay_id]
    )
    report.epochs_restored = [r["epoch"] for r in done if r["action"] == "restore"]
    report.epochs_trained = [r["epoch"] for r in done if r["action"] == "train"]
    bad = store.fetch(conn, "SELECT epoch FROM replay_bad_checkpoints WHERE replay_id = ?", [report.replay_id])
    report.bad_checkpoints = sorted(r["epoch"] for r in bad)


def _replace_unfinished(conn: sqlite3.Connection, report: ReplayReport) -> None:
    """A finished replay repeats the unfinished (failed, crashed) replays of its run where it logged the same
    name at the same epoch: their values there are deleted, so no cell holds both. Their other values stay
    (``flor.query(..., unfinished=True)`` shows them)."""
    statuses = _runs.replay_statuses(conn, report.run_id)
    stale = [r for r, status in statuses.items() if status in ("failed", "crashed") and r != report.replay_id]
    with store.immediate(conn):
        for other in stale:
            gone = conn.execute(
                "DELETE FROM logs WHERE run_id = ? AND replay_id = ? AND EXISTS (SELECT 1 FROM logs n "
                "WHERE n.run_id = logs.run_id AND n.replay_id = ? AND n.name = logs.name AND n.epoch = logs.epoch)",
                [report.run_id, other, report.replay_id],
            ).rowcount
            if gone:
                report.replaced_values += gone
                report.replaced_replays.append(other)


def _check_like_recording(trainer: pl.Trainer, settings: dict[str, Any], retrain: bool) -> None:
    """Warn (restoring) or refuse (re-training) when the data or epochs differ from the recording."""
    recorded = settings.get("num_training_batches")
    now = trainer.num_training_batches
    if recorded is not None and not (isinstance(now, float) and math.isinf(now)) and recorded != now:
        msg = (
            f"the training data has {now} batches per epoch but the recording had {recorded}; "
            "replay with the same data, batch size and limit_train_batches"
        )
        if retrain:
            raise ReplayError(msg + " (re-training on other data cannot reproduce the run)")
        rank_zero_warn(f"flor: {msg}; restored epochs are unaffected, but step numbers may not line up")
    if settings.get("max_epochs") not in (None, trainer.max_epochs):
        rank_zero_warn(
            f"flor: the recording used max_epochs={settings['max_epochs']}, this Trainer has "
            f"max_epochs={trainer.max_epochs}; schedules that depend on it may differ"
        )


def _compare(conn: sqlite3.Connection, report: ReplayReport) -> None:
    """Fill the report's fidelity numbers by matching replayed values with recorded ones."""
    rows = conn.execute(
        """
        SELECT r.name, r.value, r.text, o.value, o.text, o.rowid IS NOT NULL
        FROM logs r LEFT JOIN logs o
          ON o.run_id = r.run_id AND o.replay_id IS NULL AND o.stage = r.stage AND o.level = r.level
         AND o.epoch = r.epoch AND o.step = r.step AND o.name = r.name AND o.batch_idx IS r.batch_idx
        WHERE r.replay_id = ?
        """,
        [report.replay_id],
    ).fetchall()
    new_names, bad_names = set(), set()
    for name, value, text, old_value, old_text, had in rows:
        if not had:
            report.new_values += 1
            new_names.add(name)
            continue
        report.rederived += 1
        if (value, text) == (old_value, old_text):
            report.matched += 1
        else:
            report.mismatched += 1
            bad_names.add(name)
            if value is not None and old_value is not None:
                report.max_difference = max(report.max_difference, abs(value - old_value))
    report.new_names = sorted(new_names)
    report.mismatched_names = sorted(bad_names)
