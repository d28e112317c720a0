"""Replay: run a recorded run again from its checkpoints, storing what the new code logs."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flor_lightning import _lightning, codecheck, planner, shadow, store
from flor_lightning.checkpoints import CheckpointStore
from flor_lightning.errors import CheckpointError, ReplayError
from flor_lightning.locate import Location, locate

if TYPE_CHECKING:
    import sqlite3

    import lightning.pytorch as pl

    from flor_lightning.callback import FlorCallback


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

    def __str__(self) -> str:
        lines = [
            f"flor replay {self.replay_id} of run {self.run_id} finished in {self.seconds:.1f}s",
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
        return "\n".join(lines)


class _BadCheckpoint(CheckpointError):
    def __init__(self, epoch: int, message: str) -> None:
        super().__init__(message)
        self.epoch = epoch


def find_run(conn: sqlite3.Connection, run: str | None, script: str | None) -> dict[str, Any]:
    """The run to replay: ``run`` if given, else the latest run of ``script`` that has checkpoints."""
    if run is not None:
        rows = store.fetch(conn, "SELECT * FROM runs WHERE run_id = ?", [run])
        if not rows:
            recent = [r["run_id"] for r in store.fetch(conn, "SELECT run_id FROM runs ORDER BY started DESC LIMIT 5")]
            raise ReplayError(f"unknown run id {run!r}; the latest runs are {recent} (flor.runs() lists all)")
        return rows[0]
    rows = store.fetch(
        conn,
        "SELECT * FROM runs WHERE script IS ? AND run_id IN (SELECT run_id FROM checkpoints) "
        "ORDER BY started DESC LIMIT 1",
        [script],
    )
    if not rows:
        raise ReplayError(
            f"no recorded run of {script!r} with checkpoints in this project. Record one first with "
            "flor.Trainer(...).fit(...), or pass run='<id>' (flor.runs() lists the recorded runs)."
        )
    return rows[0]


def _script(loc: Location) -> str | None:
    if not sys.argv or not sys.argv[0]:
        return None
    path = Path(sys.argv[0]).resolve()
    try:
        return path.relative_to(loc.root).as_posix()
    except ValueError:
        return str(path)


def decide_training(
    trainer: pl.Trainer, model: pl.LightningModule, run: dict[str, Any], loc: Location
) -> tuple[bool, str]:
    """Whether new logging sits on the training path, by comparing code with the recorded version."""
    settings = json.loads(run["settings"] or "{}")
    if settings.get("val_check_interval", 1.0) not in (1.0, None):
        return True, "validation ran inside the epoch (val_check_interval), which checkpoints cannot reproduce"
    if not run["shadow_commit"] or not loc.in_git:
        return False, "the run has no code snapshot to compare with; restoring (pass train=True to re-train)"
    users = [
        model,
        *(
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if not type(cb).__module__.startswith(("lightning", "pytorch_lightning", "flor_lightning"))
        ),
    ]
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
) -> ReplayReport:
    """See :meth:`flor_lightning.Trainer.replay`."""
    planner.validate_segment_args(segments, segment)
    if train not in (None, True, False):
        raise ReplayError(f"train must be None (decide automatically), True or False, got {train!r}")
    flor: FlorCallback = trainer.flor  # type: ignore[attr-defined]
    loc = locate()
    if not loc.db_path.exists():
        raise ReplayError(
            f"nothing to replay: no flor log store at {str(loc.db_path)!r}. Record a run first with "
            "flor.Trainer(...).fit(...) from this project."
        )
    conn = store.connect(loc.db_path)
    try:
        rec = find_run(conn, run, _script(loc))
        ckpt_rows = {
            r["epoch"]: r for r in store.fetch(conn, "SELECT * FROM checkpoints WHERE run_id = ?", [rec["run_id"]])
        }
        timings = store.fetch(conn, "SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", [rec["run_id"]])
    finally:
        conn.close()
    if not rec["checkpoint_root"]:
        raise ReplayError(f"run {rec['run_id']} has no checkpoint location recorded; it cannot be replayed")
    ckpts = CheckpointStore(rec["checkpoint_root"])
    missing = sorted(e for e, r in ckpt_rows.items() if not ckpts.fs.exists(r["path"]))
    if missing:
        rank_zero_warn(
            f"flor: checkpoints of epochs {missing} of run {rec['run_id']} are missing; replay works around them"
        )
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
    plan = planner.plan_segments(wanted, good, train=retrain, segments=segments, cost=cost)
    chosen = plan if segment is None else [plan[segment]]
    steps = [s for seg in chosen for s in seg.steps]
    load_s = max((r["write_seconds"] for r in ckpt_rows.values()), default=0.0)
    estimate = planner.estimate_seconds(steps, train_s, val_s, load_s)
    full = sum(train_s.values()) + sum(val_s.values())
    rank_zero_info(
        f"flor: replaying run {rec['run_id']} epochs {planner.describe([e for s in chosen for e in s.epochs])}"
        f"{f' (segment {segment} of {segments})' if segment is not None else ''}: "
        f"{'re-training' if retrain else 'restoring checkpoints'} because {reason}. "
        f"Estimated {estimate:.1f}s (the recording took {full:.1f}s)."
    )
    report = ReplayReport(
        replay_id=f"{rec['run_id']}.r{uuid.uuid4().hex[:6]}", run_id=rec["run_id"], train=retrain, reason=reason
    )
    started = time.time()
    version = _commit_code(loc, f"flor replay {report.replay_id} of run {rec['run_id']}")
    conn = store.connect(loc.db_path)
    store.insert(
        conn,
        "replays",
        {
            "replay_id": report.replay_id,
            "run_id": rec["run_id"],
            "started": started,
            "status": "running",
            "shadow_commit": version,
            "plan": [asdict(s) for s in steps],
        },
    )
    status = "failed"
    try:
        for seg in chosen:
            _run_segment(
                trainer,
                model,
                flor,
                report,
                list(seg.steps),
                ckpts,
                ckpt_rows,
                good,
                rec,
                retrain,
                datamodule=datamodule,
                train_dataloaders=train_dataloaders,
                val_dataloaders=val_dataloaders,
            )
        status = "finished"
    finally:
        report.seconds = time.time() - started
        if status == "finished":
            _compare(conn, report)
        store.update(
            conn,
            "replays",
            {"replay_id": report.replay_id},
            {"status": status, "ended": time.time(), "report": asdict(report)},
        )
        conn.close()
    rank_zero_info(str(report))
    return report


def _commit_code(loc: Location, message: str) -> str | None:
    if not loc.in_git:
        return None
    try:
        return shadow.snapshot(loc.root, message=message).shadow_commit
    except Exception as err:  # the replay must not fail because the snapshot did
        rank_zero_warn(f"flor: could not snapshot the replayed code: {err}")
        return None


def _run_segment(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    flor: FlorCallback,
    report: ReplayReport,
    steps: list[planner.EpochStep],
    ckpts: CheckpointStore,
    ckpt_rows: dict[int, dict[str, Any]],
    good: set[int],
    rec: dict[str, Any],
    retrain: bool,
    **data: Any,
) -> None:
    """Run ``steps`` with the replay loop; on a corrupt checkpoint, re-plan around it and go on."""
    settings = json.loads(rec["settings"] or "{}")

    def load(epoch: int) -> dict[str, Any]:
        row = ckpt_rows[epoch]
        try:
            return ckpts.load(row["path"], row["sha256"])
        except CheckpointError as err:
            raise _BadCheckpoint(epoch, str(err)) from err

    def on_start(tr: pl.Trainer) -> None:
        _check_like_recording(tr, settings, retrain)

    def on_step_done(step: planner.EpochStep) -> None:
        done.append(step)
        (report.epochs_trained if step.action == "train" else report.epochs_restored).append(step.epoch)

    original_loop, sanity, callbacks = trainer.fit_loop, trainer.num_sanity_val_steps, trainer.callbacks  # type: ignore[attr-defined]
    flor.run_id, flor.replay_id = rec["run_id"], report.replay_id
    # Replay re-derives values, not models: Lightning's checkpoint callbacks would write (and could
    # overwrite) model files the recording already made.
    trainer.callbacks = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]  # type: ignore[attr-defined]
    try:
        while steps:
            done: list[planner.EpochStep] = []
            trainer.fit_loop = _lightning.ReplayFitLoop(trainer, steps, load, on_start, on_step_done)
            trainer.num_sanity_val_steps = 0
            try:
                trainer.fit(model, **data)
                return
            except _BadCheckpoint as err:
                good.discard(err.epoch)
                report.bad_checkpoints.append(err.epoch)
                rank_zero_warn(f"flor: {err}; re-planning from an earlier checkpoint")
                remaining = [s.epoch for s in steps[len(done) :] if s.wanted]
                steps = planner.steps_for(remaining, good, train=retrain)
    finally:
        trainer.fit_loop, trainer.num_sanity_val_steps = original_loop, sanity
        trainer.callbacks = callbacks  # type: ignore[attr-defined]
        flor.replay_id = None


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
