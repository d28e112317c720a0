"""The runs and replays a log store holds: finding them by id, and the state each is in.

One place for two rules that the command line, the queries, housekeeping and replay all need:
a run id the store does not hold is an :class:`~flor_lightning.UnknownRunError` that names the
latest runs, and a run, replay or replay segment marked ``running`` whose process is gone reads
``crashed``. Replay also chooses here the run it replays (:func:`find_run`, :func:`load_run`).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from typing import Any, Literal

from flor_lightning import _locate
from flor_lightning import _store as store
from flor_lightning._errors import ReplayError, UnknownRunError
from flor_lightning._locate import Location

Status = Literal["running", "finished", "failed", "crashed"]
"""What a run, replay or segment is: ``running``, ``finished``, ``failed``, or ``crashed`` (marked
running by a process that is gone)."""

_LATEST = 5  # runs an UnknownRunError names


def check_known(conn: sqlite3.Connection, run_ids: Iterable[str]) -> None:
    """Raise :class:`UnknownRunError` naming the ids of ``run_ids`` the store does not hold."""
    wanted = sorted(set(run_ids))
    if wanted:
        rows = store.fetch(conn, "SELECT run_id, started FROM runs")
        check_listed(wanted, {r["run_id"]: r["started"] for r in rows})


def check_listed(run_ids: Iterable[str], started: Mapping[str, Any]) -> None:
    """Raise :class:`UnknownRunError` naming the ids of ``run_ids`` that ``started`` (every known run id
    with its start time, of a table already read) does not hold."""
    unknown = sorted(set(run_ids) - set(started))
    if unknown:
        latest = sorted(started, key=lambda r: started[r], reverse=True)[:_LATEST]
        raise UnknownRunError(unknown, latest)


def get_run(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    """The ``runs`` row of ``run_id``; :class:`UnknownRunError` when the store has none."""
    rows = store.fetch(conn, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    if not rows:
        check_known(conn, [run_id])
    return rows[0]


def find_run(conn: sqlite3.Connection, run: str | None, script: str | None) -> dict[str, Any]:
    """The run to replay: ``run`` if given, else the latest run of ``script`` that has checkpoints."""
    if run is not None:
        return get_run(conn, run)
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


def load_run(loc: Location, run: str | None) -> tuple[dict[str, Any], dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """The run to replay (see :func:`find_run`; of the running script), its checkpoint index by epoch, and
    its epoch timings. A store that cannot be written is refused here, before replay commits any code."""
    if not loc.db_path.exists():
        raise ReplayError(
            f"nothing to replay: no flor log store at {str(loc.db_path)!r}. Record a run first with "
            "flor.Trainer(...).fit(...) from this project."
        )
    with closing(store.connect(loc.db_path)) as conn:
        store.check_writable(conn, loc.db_path)
        rec = find_run(conn, run, _locate.script(loc))
        sql = "SELECT * FROM checkpoints WHERE run_id = ? AND batch_idx IS NULL"  # those at epoch ends
        rows = store.fetch(conn, sql, [rec["run_id"]])
        timings = store.fetch(conn, "SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", [rec["run_id"]])
    return rec, {r["epoch"]: r for r in rows}, timings


def validations_inside(loc: Location, run_id: str) -> tuple[dict[tuple[int, int], dict[str, Any]], dict[int, set[int]]]:
    """The run's checkpoints taken as a validation inside an epoch ended, by ``(epoch, batch index)``, and
    the global steps each epoch validated at (where the recording logged validation values)."""
    with closing(store.connect(loc.db_path)) as conn:
        rows = store.fetch(conn, "SELECT * FROM checkpoints WHERE run_id = ? AND moment = 'validation_end'", [run_id])
        steps = conn.execute(
            "SELECT DISTINCT epoch, step FROM logs WHERE run_id = ? AND replay_id IS NULL AND stage = 'validate'",
            [run_id],
        ).fetchall()
    validated: dict[int, set[int]] = {}
    for epoch, step in steps:
        validated.setdefault(int(epoch), set()).add(int(step))
    return {(r["epoch"], r["batch_idx"]): r for r in rows}, validated


def checkpoints_inside(loc: Location, run_id: str) -> dict[tuple[int, int], dict[str, Any]]:
    """The run's checkpoints inside its epochs (at validation points and training batch ends), by
    ``(epoch, batch index)``."""
    with closing(store.connect(loc.db_path)) as conn:
        rows = store.fetch(conn, "SELECT * FROM checkpoints WHERE run_id = ? AND batch_idx IS NOT NULL", [run_id])
    return {(r["epoch"], r["batch_idx"]): r for r in rows}


def step_spans(loc: Location, run_id: str) -> dict[int, tuple[int, int]]:
    """Per epoch, the first and last global step the recording logged a value at."""
    with closing(store.connect(loc.db_path)) as conn:
        rows = conn.execute(
            "SELECT epoch, MIN(step), MAX(step) FROM logs WHERE run_id = ? AND replay_id IS NULL GROUP BY epoch",
            [run_id],
        ).fetchall()
    return {int(e): (int(lo), int(hi)) for e, lo, hi in rows}


def last_batch_before(loc: Location, run_id: str, epoch: int, stop: int) -> int | None:
    """The last training batch index of ``epoch`` whose values the recording logged at a global step below
    ``stop`` (None: it logged none there)."""
    with closing(store.connect(loc.db_path)) as conn:
        (found,) = conn.execute(
            "SELECT MAX(batch_idx) FROM logs WHERE run_id = ? AND replay_id IS NULL AND stage = 'train' "
            "AND epoch = ? AND step < ?",
            [run_id, epoch, stop],
        ).fetchone()
    return None if found is None else int(found)


def pid_alive(pid: int | None, host: str | None, this_host: str | None = None) -> bool:
    """Whether process ``pid`` on ``host`` may still run (a process on another host is assumed alive)."""
    if pid is None or host != (this_host or socket.gethostname()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(row: Mapping[str, Any], host: str | None = None) -> Status:
    """The status of a ``runs`` or ``replay_segments`` row as it stands: ``crashed`` for one marked
    running whose process is gone."""
    marked: Status = row["status"]
    if marked == "running" and not pid_alive(row["pid"], row["host"], host):
        return "crashed"
    return marked


def replay_alive(conn: sqlite3.Connection, replay_id: str, host: str | None = None) -> bool:
    """Whether a replay marked running may still be: a segment's process lives, or none has started
    yet and the process that registered the replay lives (unknown in stores older than 0004: kept).
    """
    segs = store.fetch(conn, "SELECT status, pid, host FROM replay_segments WHERE replay_id = ?", [replay_id])
    if not segs:
        (owner,) = store.fetch(conn, "SELECT pid, host FROM replays WHERE replay_id = ?", [replay_id])
        return owner["pid"] is None or pid_alive(owner["pid"], owner["host"], host)
    return any(status(s, host) == "running" for s in segs)


def replay_statuses(conn: sqlite3.Connection, run_id: str | None = None) -> dict[str, Status]:
    """Each replay's status (of ``run_id``, or all) as it stands: ``crashed`` for one marked running
    whose processes are gone."""
    host = socket.gethostname()
    where, params = ("WHERE run_id = ?", [run_id]) if run_id is not None else ("", [])
    rows = store.fetch(conn, f"SELECT replay_id, status FROM replays {where}", params)
    return {
        r["replay_id"]: "crashed"
        if r["status"] == "running" and not replay_alive(conn, r["replay_id"], host)
        else r["status"]
        for r in rows
    }
