"""Replay: run a recorded run again from its checkpoints, storing what the new code logs.

This module puts the steps in order; each lives in a module of its own: :mod:`._runs` chooses the
run, :mod:`._codecheck` decides whether to re-train, :mod:`._planner` splits the epochs into
segments, :mod:`._segments` runs this process's segments and keeps their records, and
:mod:`._report` compares the replayed values with the recorded ones and stores the report. On a
node other than the launching one nothing is planned: rank 0's plan arrives as the ranks come up,
and the rank's records go to a node store (:mod:`._nodes`).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flor_lightning import _codecheck as codecheck
from flor_lightning import _codeversion as codeversion
from flor_lightning import _drift as drift
from flor_lightning import _lightning, _nodes, _runs
from flor_lightning import _planner as planner
from flor_lightning import _shadow as shadow
from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import ReplayError
from flor_lightning._locate import Location, locate, process_local
from flor_lightning._metadata import hyperparameters
from flor_lightning._report import ReplayReport, cause, store_report
from flor_lightning._segments import REPLAY_ID_ENV, SegmentRunner, flor_callback, wait_for_segments

if TYPE_CHECKING:
    import lightning.pytorch as pl


def run_replay(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    *,
    datamodule: Any,
    train_dataloaders: Any,
    val_dataloaders: Any,
    run: str | None,
    epochs: Sequence[int] | range | None,
    steps: range | None = None,
    segments: int,
    segment: int | None,
    train: bool | None,
    loggers: bool = True,
    clock: Callable[[], float] = time.time,
) -> ReplayReport:
    """See :meth:`flor_lightning.Trainer.replay`; ``clock`` gives the times the replay's records carry."""
    _check_arguments(trainer, epochs, segments, segment, train)
    planner.validate_steps(steps, epochs)
    loc = locate()
    data = {"datamodule": datamodule, "train_dataloaders": train_dataloaders, "val_dataloaders": val_dataloaders}
    if trainer.world_size > 1 and trainer.node_rank > 0:
        return _replay_on_another_node(trainer, model, loc, data, segments, clock)
    rec, ckpt_rows, timings = _runs.load_run(loc, run)
    if not rec["checkpoint_root"]:
        raise ReplayError(f"run {rec['run_id']} has no checkpoint location recorded; it cannot be replayed")
    ckpts = CheckpointStore(rec["checkpoint_root"])
    missing = sorted(e for e, r in ckpt_rows.items() if not ckpts.exists(r["path"]))
    good = {e for e in ckpt_rows if e not in missing}
    recorded_epochs = [t["epoch"] for t in timings] or sorted(e for e in ckpt_rows if e >= 0)
    wanted = (
        planner.epoch_list(epochs, recorded_epochs)
        if steps is None
        else planner.epochs_of_steps(steps, _runs.step_spans(loc, rec["run_id"]))
    )
    inside, points, why = _validations_inside(
        loc, rec, wanted, {e: r for e, r in ckpt_rows.items() if e in good}, ckpts
    )
    retrain, reason = (
        _decide_training(trainer, model, rec, loc, why) if train is None else (train, f"train={train} was given")
    )
    train_s = {t["epoch"]: t["ended"] - t["started"] - t["val_seconds"] for t in timings}
    val_s = {t["epoch"]: t["val_seconds"] for t in timings}
    cost = {e: val_s.get(e, 0.0) + (train_s.get(e, 0.0) if retrain else 0.0) for e in wanted}
    # each segment starts with the model as passed in (so it may re-train from the start), unless one
    # process runs several segments one after the other
    scratch = segments == 1 or segment is not None or trainer.world_size > 1
    points = None if retrain else points
    if points is not None and any(batches for batches, _ in points.values()):
        reason += "; each validation point inside an epoch from its checkpoint"
    within = segments > 1 and len(wanted) == 1  # one epoch: its segments divide it
    plan = planner.plan_segments(
        wanted, good, train=retrain, segments=1 if within else segments, cost=cost, scratch=scratch, points=points
    )
    inside = {**_checkpoints_inside(loc, rec["run_id"], ckpts), **inside}
    plan, notes = _inside_epochs(plan, within, segments, steps, retrain, loc, rec, inside, timings, ckpts)
    reason += "".join(f"; {note}" for note in notes)
    chosen = plan if segment is None else [plan[segment]]
    replay_id = os.environ.get(REPLAY_ID_ENV) or f"{rec['run_id']}.r{uuid.uuid4().hex[:6]}"
    report = ReplayReport(replay_id=replay_id, run_id=rec["run_id"], train=retrain, reason=reason, notes=notes)
    primary, started = trainer.global_rank == 0, clock()
    if primary:
        _warn_missing(rec, ckpt_rows, missing, ckpts)
        drift.warn_hparams(rec, hyperparameters(model, None, datamodule or train_dataloaders))
        batches = json.loads(rec["settings"] or "{}").get("num_training_batches")
        batches = int(batches) if isinstance(batches, (int, float)) and 0 < batches < float("inf") else None
        _announce(
            rec["run_id"], chosen, segment, segments, retrain, reason, (train_s, val_s, batches), ckpt_rows, steps
        )
        _register(trainer, loc, rec, replay_id, chosen, started)
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
        clock=clock,
        inside=inside,
        points=points,
    )
    report.status = "failed"
    try:
        runner.run(trainer, model, **data)
        if primary and trainer.world_size > 1:
            nodes = _nodes.folder(rec["checkpoint_root"], rec["run_id"], replay_id) if trainer.num_nodes > 1 else None
            wait_for_segments(str(loc.db_path), replay_id, segments, run_id=rec["run_id"], nodes=nodes)
        report.status = "finished"
    except BaseException as err:
        report.error = cause(err)
        raise
    finally:
        report.replay_id = runner.replay_id  # rank 0's (a rank other than 0 took it over as the ranks came up)
        report.seconds = clock() - started
        store_report(loc.db_path, report, primary=primary, clock=clock)
    rank_zero_info(str(report))
    return report


def _replay_on_another_node(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    loc: Location,
    data: dict[str, Any],
    segments: int,
    clock: Callable[[], float],
) -> ReplayReport:
    """A rank on a node other than the launching one: its log store holds none of the run's records, so
    rank 0's plan reaches it as the ranks come up (:meth:`SegmentRunner.adopt`), and its records go to a
    node store that the launching rank merges (:mod:`._nodes`)."""
    runner = SegmentRunner(
        db_path=str(loc.db_path),
        replay_id="",
        run={"run_id": "", "settings": None},
        segments=[],
        total_segments=segments,
        checkpoint_root="",
        checkpoints={},
        good=set(),
        retrain=False,
        loggers=False,
        clock=clock,
    )
    report = ReplayReport(replay_id="", run_id="", train=False, reason="planned by rank 0", status="failed")
    started = clock()
    try:
        runner.run(trainer, model, **data)
        report.status = "finished"
    except BaseException as err:
        report.error = cause(err)
        raise
    finally:
        report.replay_id, report.run_id, report.train = runner.replay_id, runner.run_id, runner.retrain
        report.seconds = clock() - started
        if runner.node_store is not None:
            store_report(runner.db_path, report, primary=False, clock=clock)
    return report


def _validations_inside(
    loc: Location,
    rec: dict[str, Any],
    wanted: list[int],
    ends: dict[int, dict[str, Any]],
    ckpts: CheckpointStore,
) -> tuple[dict[tuple[int, int], dict[str, Any]], planner.Points | None, str | None]:
    """For a run that validated inside its epochs: its checkpoints at those validation points (files
    present), where each wanted epoch validated (None when a validation point has no checkpoint), and
    why not (None: every one can be restored)."""
    settings = json.loads(rec["settings"] or "{}")
    if settings.get("val_check_interval", 1.0) in (1.0, None):
        return {}, None, None
    rows, validated = _runs.validations_inside(loc, rec["run_id"])
    inside = {k: r for k, r in rows.items() if ckpts.exists(r["path"])}
    by_epoch: dict[int, dict[int, int]] = {}
    for (epoch, batch_idx), r in inside.items():
        by_epoch.setdefault(epoch, {})[r["step"]] = batch_idx
    found = planner.validation_points(
        wanted, validated_at=validated, end_steps={e: r["step"] for e, r in ends.items()}, inside=by_epoch
    )
    if isinstance(found, str):
        return inside, None, f"but {found}"
    return inside, found, None


def _checkpoints_inside(loc: Location, run_id: str, ckpts: CheckpointStore) -> dict[tuple[int, int], dict[str, Any]]:
    """The run's checkpoints inside its epochs whose files are present, by (epoch, batch index)."""
    return {k: r for k, r in _runs.checkpoints_inside(loc, run_id).items() if ckpts.exists(r["path"])}


def _slice(
    plan: list[planner.Segment],
    steps: range,
    *,
    retrain: bool,
    loc: Location,
    run_id: str,
    inside: dict[tuple[int, int], dict[str, Any]],
    ckpts: CheckpointStore,
) -> tuple[list[planner.Segment], list[str]]:
    """``plan`` narrowed to the global ``steps`` (``replay(steps=...)``): re-training starts from the latest
    checkpoint inside the first epoch that precedes ``steps`` where a restart from it is exact, and stops once
    the last batch logging inside ``steps`` is done. Returns the plan and what it says about where training
    starts (or why not from inside the epoch)."""
    wanted = [e for seg in plan for e in seg.epochs]
    start, stop, notes = None, None, []
    if retrain:
        first = wanted[0]
        points = [(r["step"], b, r["moment"]) for (e, b), r in inside.items() if e == first]
        found = planner.start_inside(steps.start, points)
        if found is not None:
            exact, note = _start_note(ckpts, first, inside[(first, found[1])])
            start = (first, found[1]) if exact else None
            notes.append(note)
        last = _runs.last_batch_before(loc, run_id, wanted[-1], steps.stop)
        stop = (wanted[-1], last + 1) if last is not None else None
    sliced = [
        planner.Segment(seg.index, tuple(planner.slice_steps(seg.steps, steps, start=start, stop=stop))) for seg in plan
    ]
    return sliced, notes


def _bridge(
    plan: list[planner.Segment], inside: dict[tuple[int, int], dict[str, Any]], ckpts: CheckpointStore
) -> tuple[list[planner.Segment], list[str]]:
    """``plan`` with every epoch trained only to reach a wanted one started from its latest checkpoint inside
    (:func:`planner.bridge`) where a restart from it is exact; and a note for each such epoch."""
    reached = {s.epoch for seg in plan for s in seg.steps if s.action == "train" and not s.wanted}
    starts: dict[int, int] = {}
    notes: dict[int, str] = {}
    for epoch in sorted(reached):
        rows = [r for (e, _), r in inside.items() if e == epoch]
        if not rows:
            continue
        row = max(rows, key=lambda r: r["batch_idx"])
        exact, notes[epoch] = _start_note(ckpts, epoch, row)
        if exact:
            starts[epoch] = row["batch_idx"]
    bridged = [planner.Segment(seg.index, tuple(planner.bridge(seg.steps, starts))) for seg in plan]
    used = {s.epoch for seg in bridged for s in seg.steps if s.start_inside is not None}
    return bridged, [note for e, note in notes.items() if e in used or e not in starts]


def _split_epoch(
    seg: planner.Segment,
    segments: int,
    *,
    inside: dict[tuple[int, int], dict[str, Any]],
    timings: list[dict[str, Any]],
    ckpts: CheckpointStore,
) -> list[planner.Segment]:
    """The replay of one epoch divided into ``segments`` (:func:`planner.split_epoch`), balanced by the recorded
    time: between its checkpoints inside when it re-trains (each taken at its ``created`` time less its write), by
    its validation points when it restores."""
    if len(seg.steps) != 1:
        raise ReplayError(
            f"epoch {seg.epochs} is re-trained from an earlier epoch's checkpoint, so it cannot be divided into "
            f"segments; replay with segments=1"
        )
    (step,) = seg.steps
    cuts: list[int] = []
    cost: list[float] = [1.0] * (len(step.inside) + 1)
    if step.action == "train":
        rows = sorted((r for (e, _), r in inside.items() if e == step.epoch), key=lambda r: r["batch_idx"])
        inexact = _inexact(ckpts, rows[0]) if rows else None
        if inexact is not None:
            raise ReplayError(
                f"epoch {step.epoch} cannot be divided into segments at its checkpoints inside: a restart from them "
                f"is not exact ({inexact}); replay with segments=1"
            )
        cuts = [r["batch_idx"] for r in rows]
        timing = next((t for t in timings if t["epoch"] == step.epoch), None)
        cost = [1.0] * (len(cuts) + 1)  # no time recorded: each stretch alike
        if timing is not None:
            marks = [timing["started"], *(r["created"] - r["write_seconds"] for r in rows), timing["ended"]]
            cost = [max(b - a, 0.0) for a, b in itertools.pairwise(marks)]
    return [planner.Segment(i, (s,)) for i, s in enumerate(planner.split_epoch(step, segments, cuts=cuts, cost=cost))]


def _divided(plan: list[planner.Segment]) -> str:
    """Where a one-epoch replay's segments begin, in a sentence."""
    (first,) = plan[0].steps
    if first.action == "train":
        starts = [f"after batch {seg.steps[0].start_inside}" for seg in plan[1:]]
        return f"epoch {first.epoch} divided at its checkpoints inside {', '.join(starts)}"
    sizes = [len(seg.steps[0].inside) + seg.steps[0].end for seg in plan]
    return f"epoch {first.epoch}'s validation points divided {'+'.join(map(str, sizes))}"


def _start_note(ckpts: CheckpointStore, epoch: int, row: dict[str, Any]) -> tuple[bool, str]:
    """Whether re-training can start from the checkpoint inside ``epoch`` of ``row`` exactly, and the note saying
    where it starts."""
    where = f"the checkpoint inside epoch {epoch} after batch {row['batch_idx']} (step {row['step']})"
    inexact = _inexact(ckpts, row)
    if inexact is None:
        return True, f"training starts from {where}"
    return False, f"training starts at the epoch's start, not from {where}, which is not exact: {inexact}"


def _inexact(ckpts: CheckpointStore, row: dict[str, Any]) -> str | None:
    """Why a restart from the checkpoint inside an epoch of ``row`` would not be exact (None: it would be), as
    the recording found its training data (:func:`flor_lightning._midepoch.data_skip`)."""
    state = ckpts.read_state(row["path"], row["sha256"])
    how = state.get("flor", {}).get("mid_epoch", {}).get("data_skip")
    return None if how in ("stateful", "sampler", "fetch") else str(how)


def _decide_training(
    trainer: pl.Trainer, model: pl.LightningModule, run: dict[str, Any], loc: Location, inside: str | None
) -> tuple[bool, str]:
    """:func:`codecheck.decide_training` against the run's code snapshot on the shadow branch."""
    commit = run["shadow_commit"]

    def recorded(file: Path) -> str | None:
        return shadow.read_file(loc.root, commit, file.relative_to(loc.root).as_posix())

    return codecheck.decide_training(
        json.loads(run["settings"] or "{}"),
        model=model,
        callbacks=trainer.callbacks,  # type: ignore[attr-defined]
        root=loc.root,
        read_recorded=recorded if commit and loc.in_git else None,
        inside=inside,
    )


def _register(
    trainer: pl.Trainer,
    loc: Location,
    rec: dict[str, Any],
    replay_id: str,
    chosen: list[planner.Segment],
    started: float,
) -> None:
    """Commit the code replayed and add the replay, marked running, to the store."""
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


def _inside_epochs(
    plan: list[planner.Segment],
    within: bool,
    segments: int,
    steps: range | None,
    retrain: bool,
    loc: Location,
    rec: dict[str, Any],
    inside: dict[tuple[int, int], dict[str, Any]],
    timings: list[dict[str, Any]],
    ckpts: CheckpointStore,
) -> tuple[list[planner.Segment], list[str]]:
    """``plan`` refined at the checkpoints inside epochs: one epoch divided into ``segments`` (``within``), epochs
    reached from a checkpoint inside the epoch before (re-training), a ``steps`` slice; with the notes saying so."""
    notes: list[str] = []
    if within:
        if steps is not None:
            raise ReplayError("steps= replays its slice in one segment; pass segments=1 with steps=")
        plan = _split_epoch(plan[0], segments, inside=inside, timings=timings, ckpts=ckpts)
        notes.append(_divided(plan))
    if retrain:
        plan, bridged = _bridge(plan, inside, ckpts)
        notes += bridged
    if steps is not None:
        plan, more = _slice(plan, steps, retrain=retrain, loc=loc, run_id=rec["run_id"], inside=inside, ckpts=ckpts)
        notes += more
    return plan, notes


def _check_arguments(
    trainer: pl.Trainer, epochs: object, segments: int, segment: int | None, train: bool | None
) -> None:
    """Refuse what cannot replay before anything runs: no FlorCallback, bad arguments, a spawning strategy."""
    flor_callback(trainer)
    planner.validate_segment_args(segments, segment)
    if train not in (None, True, False):
        raise ReplayError(f"train must be None (decide automatically), True or False, got {train!r}")
    world = trainer.world_size
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
    planner.validate_epochs(epochs)
    if trainer.num_nodes > 1:
        _nodes.heartbeat_seconds()  # a bad FLOR_HEARTBEAT_S fails here, before anything runs
        if _lightning.forks_ranks(trainer):
            raise ReplayError(
                f"replay on {trainer.num_nodes} nodes runs with strategy='ddp' (each node launched from its "
                "environment: NODE_RANK, MASTER_ADDR, MASTER_PORT, or srun / torchrun), not 'ddp_fork'"
            )
    if world > 1 and _lightning.spawns_ranks(trainer):
        raise ReplayError(
            "multi-process replay runs with strategy='ddp' (each rank re-runs your script) or 'ddp_fork' (ranks "
            "forked from this process), not with a spawning strategy such as 'ddp_spawn'; or replay one segment "
            "per single-device process with segment=i"
        )


def _announce(
    run_id: str,
    chosen: list[planner.Segment],
    segment: int | None,
    segments: int,
    retrain: bool,
    reason: str,
    timing: tuple[dict[int, float], dict[int, float], int | None],
    ckpt_rows: dict[int, dict[str, Any]],
    sliced: range | None = None,
) -> None:
    """Say what the replay does and why, and how long it should take (``timing``: the recorded training and
    validation seconds per epoch, and the batches per epoch, None when unknown)."""
    steps = [s for seg in chosen for s in seg.steps]
    load_s = max((r["write_seconds"] for r in ckpt_rows.values()), default=0.0)
    train_s, val_s, batches = timing
    estimate = planner.estimate_seconds(steps, train_s, val_s, load_s, batches)
    if segments > 1 and segment is None:
        estimate = max(planner.estimate_seconds(seg.steps, train_s, val_s, load_s, batches) for seg in chosen)
    full = sum(train_s.values()) + sum(val_s.values())
    which = (
        f" (segment {segment} of {segments})"
        if segment is not None
        else (f" in {segments} segments" if segments > 1 else "")
    )
    epochs = f"epochs {planner.describe(sorted({e for s in chosen for e in s.epochs}))}"
    if sliced is not None:
        epochs = f"steps {sliced.start}-{sliced[-1]} ({epochs})"
    rank_zero_info(
        f"flor: replaying run {run_id} {epochs}{which}: "
        f"{'re-training' if retrain else 'restoring checkpoints'} because {reason}. "
        f"Estimated {estimate:.1f}s (the recording took {full:.1f}s)."
    )
