"""The replay report: what a replay did and how faithfully it reproduced the recording.

Everything here reads and writes the log store only (no Trainer): :func:`fill_epochs` gathers the
epochs the segments restored or re-trained, :func:`compare` matches each replayed value with the
recorded one at the same place, :func:`replace_unfinished` drops what unfinished replays stored
where a finished one logged again, and :func:`store_report` does all three and stores the report.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from flor_lightning import _planner as planner
from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._errors import FlorError


@dataclass
class ReplayReport:
    """What a replay did and how faithfully it reproduced the recording.

    ``rederived`` counts values that were recorded and logged again; ``matched`` those equal
    bit for bit (NaN matches NaN); ``max_difference`` is the largest absolute difference
    among the mismatched numeric ones. ``new_values`` counts values of names the recording
    did not have at that point (the hindsight metrics). ``notes`` say how the checkpoints inside epochs
    were used: where re-training started inside an epoch (or why it could not start there exactly and started
    at the epoch's start instead), where a one-epoch replay's segments begin.
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
    notes: list[str] = field(default_factory=list)

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
        lines += [f"  {note}" for note in self.notes]
        if self.bad_checkpoints:
            lines.append(f"  checkpoints that failed their checksum and were worked around: {self.bad_checkpoints}")
        if self.replaced_values:
            lines.append(
                f"  replaced {self.replaced_values} values of unfinished replay(s) {', '.join(self.replaced_replays)} "
                "at the epochs and names this one logged again"
            )
        return "\n".join(lines)


def cause(err: BaseException) -> str:
    """The error a replay stopped with, as its report names it."""
    if isinstance(err, SystemExit):  # Lightning turns Ctrl-C (KeyboardInterrupt) into sys.exit(1)
        return f"interrupted: SystemExit({err.code}), as Lightning exits on Ctrl-C"
    return f"{type(err).__name__}: {err}".strip()


def store_report(db_path: str | Path, report: ReplayReport, *, primary: bool, clock: Callable[[], float]) -> None:
    """Fill in what the replay did, finished or not, and store it with its status (the primary rank).

    A finished replay replaces the values of unfinished ones it repeats. When the replay failed, trouble
    writing its record is only warned about: the replay's own error is the one raised.
    """
    try:
        with closing(store.connect(db_path)) as c:
            fill_epochs(c, report)
            if primary:
                compare(c, report)
                if report.status == "finished":
                    replace_unfinished(c, report)
                row = {"status": report.status, "ended": clock(), "report": asdict(report)}
                store.update(c, "replays", {"replay_id": report.replay_id}, row)
    except FlorError as err:
        if report.status == "finished":
            raise
        rank_zero_warn(f"flor: could not store the report of the failed replay {report.replay_id}: {err}")
    if report.status != "finished" and primary:
        rank_zero_warn(f"flor: {report}")  # what it did before it failed, as stored


def fill_epochs(conn: sqlite3.Connection, report: ReplayReport) -> None:
    """The epochs the replay's segments restored and re-trained, and the checkpoints they found bad."""
    done = store.fetch(
        conn, "SELECT DISTINCT epoch, action FROM replay_epochs WHERE replay_id = ? ORDER BY epoch", [report.replay_id]
    )
    report.epochs_restored = [r["epoch"] for r in done if r["action"] == "restore"]
    report.epochs_trained = [r["epoch"] for r in done if r["action"] == "train"]
    bad = store.fetch(conn, "SELECT epoch FROM replay_bad_checkpoints WHERE replay_id = ?", [report.replay_id])
    report.bad_checkpoints = sorted(r["epoch"] for r in bad)


def replace_unfinished(conn: sqlite3.Connection, report: ReplayReport) -> None:
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


def compare(conn: sqlite3.Connection, report: ReplayReport) -> None:
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
