"""Replay past one machine with no shared log store: node stores beside the checkpoints, merged once.

A rank on a node other than the launching one (``trainer.node_rank > 0``) cannot write the project's
sqlite file, which lives on the launching node. It writes its values and its segment's status to a
sqlite file of its own on its node (:class:`NodeStore`), and publishes, through fsspec, into the
run's checkpoint folder, which every node reads (shared storage or an object store)::

    <checkpoint root>/<run id>/replays/<replay id>/node-<k>.rank-<r>.json     its status and heartbeat
    <checkpoint root>/<run id>/replays/<replay id>/node-<k>.rank-<r>.sqlite   its rows, once it ended

The status file is rewritten every :data:`HEARTBEAT_S` seconds while the segment runs, so the
launching rank tells a live node from a dead one without reaching it; the sqlite file is uploaded
(atomically) before the final status, so a final status means the rows are there. The launching
rank merges each file into the project's store with :func:`merge`, which ``flor merge <replay>``
runs by hand: its rows and a ``replay_merges`` row go in one transaction, so a merge run again, or
after a kill, adds nothing twice. Nothing here imports torch: the ``flor`` command uses it.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flor_lightning import _store as store
from flor_lightning._atomic import atomic
from flor_lightning._errors import ConfigError, ReplayError, StoreError
from flor_lightning._locate import open_fs

HEARTBEAT_ENV = "FLOR_HEARTBEAT_S"
HEARTBEAT_S = 10.0
"""How often a node's rank rewrites its status while its segment runs (unless ``FLOR_HEARTBEAT_S`` says)."""

STALE_BEATS = 12
"""Heartbeats the launching rank waits for in vain before it takes a running node for dead."""


def heartbeat_seconds(env: Mapping[str, str] | None = None) -> float:
    """The heartbeat period: ``FLOR_HEARTBEAT_S`` (set it alike on every node), else :data:`HEARTBEAT_S`.

    Raises:
        ConfigError: it is not a positive number.
    """
    text = (os.environ if env is None else env).get(HEARTBEAT_ENV)
    if not text:
        return HEARTBEAT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{HEARTBEAT_ENV}={text!r} must be a number of seconds above 0 (default {HEARTBEAT_S:g})")
    return seconds


TABLES = ("logs", "replay_segments", "replay_epochs", "replay_bad_checkpoints")
"""The tables a node store fills, each keyed by ``replay_id``."""


def folder(checkpoint_root: str, run_id: str, replay_id: str) -> str:
    """Where the node stores of ``replay_id`` are published: inside the run's checkpoint folder (so
    ``flor gc`` frees them with the run)."""
    return f"{checkpoint_root.rstrip('/')}/{run_id}/replays/{replay_id}"


class NodeStore:
    """The records of one rank off the launching node: a local sqlite file, published to ``url``.

    Args:
        db_path: the node's own log store (``FLOR_DB``); the rank's file lies beside it, under
            ``replays/<replay id>/``, and stays there after it is published.
        url: :func:`folder` of the replay.
        node: the node's rank; ``rank``: the process's global rank.
    """

    def __init__(self, db_path: Path | str, url: str, *, replay_id: str, node: int, rank: int) -> None:
        self.name = f"node-{node}.rank-{rank}"
        self.path = Path(db_path).parent / "replays" / replay_id / f"{self.name}.sqlite"
        self.url, self.node, self.rank = url, node, rank
        self._status: dict[str, Any] = {}
        self._beating: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def running(self, row: dict[str, Any], *, interval: float | None = None) -> None:
        """Publish the segment's ``replay_segments`` row as running and keep it beating until :meth:`ended`
        (every ``interval`` seconds: :func:`heartbeat_seconds` unless given)."""
        interval = heartbeat_seconds() if interval is None else interval
        self._status = {**row, "beat": 0, "store": f"{socket.gethostname()}:{self.path}"}
        self._publish_status()
        self._beating = stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                self._status["beat"] += 1
                try:
                    self._publish_status()
                except OSError:  # a missed beat is retried at the next; only a long silence reads as dead
                    continue

        self._thread = threading.Thread(target=beat, name="flor-node-heartbeat", daemon=True)
        self._thread.start()

    def ended(self, row: dict[str, Any]) -> None:
        """Stop the heartbeat, upload the rank's rows, then publish its final row (``status``, ``error``)."""
        if self._beating is not None and self._thread is not None:
            self._beating.set()
            self._thread.join()
        self._upload()
        self._status = {**self._status, **row}
        self._publish_status()

    def _publish_status(self) -> None:
        fs, base = open_fs(self.url)
        with atomic(fs, f"{base}/{self.name}.json") as tmp:
            fs.pipe_file(tmp, json.dumps(self._status).encode())

    def _upload(self) -> None:
        """A consistent copy of the local file (sqlite's backup: whatever the WAL holds goes in), put atomically."""
        fs, base = open_fs(self.url)
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "copy.sqlite")
            with closing(sqlite3.connect(self.path)) as src, closing(sqlite3.connect(copy)) as dst:
                src.backup(dst)
            with atomic(fs, f"{base}/{self.name}.sqlite") as remote:
                fs.put_file(copy, remote)


def statuses(url: str) -> dict[int, dict[str, Any]]:
    """The published status of each segment run off the launching node, by segment."""
    fs, base = open_fs(url)
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(fs.glob(f"{base}/node-*.json")):
        try:
            row = json.loads(fs.cat_file(path))
        except (OSError, ValueError):  # being replaced right now: read again at the next poll
            continue
        found[int(row["segment"])] = row
    return found


@dataclass
class MergeResult:
    """What :func:`merge` did: the node stores it merged now, those merged before, and the rows it added."""

    merged: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    rows: int = 0


def merge(db_path: Path | str, url: str, replay_id: str, *, clock: Callable[[], float]) -> MergeResult:
    """Merge every node store published under ``url`` into the log store at ``db_path``, each exactly once.

    Raises:
        StoreError: a published file is not a flor store.
    """
    fs, base = open_fs(url)
    result = MergeResult()
    remote = sorted(fs.glob(f"{base}/node-*.sqlite")) if fs.isdir(base) else []
    with closing(store.connect(db_path)) as conn:
        for path in remote:
            source = posixpath.basename(path)
            added = None
            if not _merged(conn, replay_id, source):  # not downloaded again at each poll of the wait
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, source)
                    fs.get_file(path, local)
                    added = _merge_one(conn, local, replay_id, source, clock())
            if added is None:
                result.already.append(source)
            else:
                result.merged.append(source)
                result.rows += added
    return result


def _merge_one(conn: sqlite3.Connection, local: str, replay_id: str, source: str, now: float) -> int | None:
    """Add the rows of ``replay_id`` from the node store ``local`` and mark it merged, in one transaction;
    None where it was merged before."""
    try:
        conn.execute("ATTACH DATABASE ? AS node", [local])
    except sqlite3.DatabaseError as err:
        raise StoreError(f"cannot read the node store {source} of replay {replay_id}: {err}") from err
    try:
        with store.immediate(conn):
            if _merged(conn, replay_id, source):  # by another merge since the check before the download
                return None
            added = 0
            for table in TABLES:
                cols = ", ".join(r[1] for r in conn.execute(f"PRAGMA main.table_info({table})"))
                cur = conn.execute(
                    f"INSERT OR REPLACE INTO main.{table} ({cols}) SELECT {cols} FROM node.{table} WHERE replay_id = ?",
                    [replay_id],
                )
                added += cur.rowcount
            row = {"replay_id": replay_id, "source": source, "rows": added, "merged": now}
            store.insert(conn, "replay_merges", row, replace=False)
        return added
    finally:
        conn.execute("DETACH DATABASE node")


def _merged(conn: sqlite3.Connection, replay_id: str, source: str) -> bool:
    done = "SELECT 1 FROM replay_merges WHERE replay_id = ? AND source = ?"
    return conn.execute(done, [replay_id, source]).fetchone() is not None


def replay_folder(db_path: Path | str, replay_id: str) -> str:
    """:func:`folder` of a replay the store at ``db_path`` holds.

    Raises:
        ReplayError: the store holds no such replay, or its run has no checkpoint location.
    """
    with closing(store.connect(db_path)) as conn:
        rows = store.fetch(
            conn,
            "SELECT p.run_id, r.checkpoint_root FROM replays p JOIN runs r USING (run_id) WHERE p.replay_id = ?",
            [replay_id],
        )
        latest = store.fetch(conn, "SELECT replay_id FROM replays ORDER BY started DESC LIMIT 5")
    if not rows:
        known = [r["replay_id"] for r in latest]
        raise ReplayError(
            f"the log store {str(db_path)!r} holds no replay {replay_id!r}"
            + (f"; the latest are {known}" if known else "")
            + ". Merge on the node that launched the replay (its FLOR_DB), naming the id the replay printed."
        )
    if not rows[0]["checkpoint_root"]:
        raise ReplayError(f"run {rows[0]['run_id']} of replay {replay_id} has no checkpoint location recorded")
    return folder(rows[0]["checkpoint_root"], rows[0]["run_id"], replay_id)
