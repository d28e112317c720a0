"""The log store: one sqlite file (WAL mode) holding runs, logged values, checkpoints and replays.

Recorded and replayed values share the ``logs`` table; a recorded value has ``replay_id`` NULL,
a replayed one carries the id of its replay, so nothing replayed ever overwrites a recording.
Values arrive through :class:`LogWriter`, a background thread that batches inserts so that
``self.log`` never waits on disk.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flor_lightning._errors import StoreError

# Named, ordered migrations: each runs once, in order, inside one transaction.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_initial",
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            script TEXT,
            argv TEXT,
            started REAL NOT NULL,
            ended REAL,
            status TEXT NOT NULL,
            pid INTEGER,
            host TEXT,
            hparams TEXT,
            settings TEXT,
            versions TEXT,
            shadow_commit TEXT,
            head_commit TEXT,
            branch TEXT,
            checkpoint_root TEXT
        );
        CREATE TABLE replays (
            replay_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            started REAL NOT NULL,
            ended REAL,
            status TEXT NOT NULL,
            shadow_commit TEXT,
            plan TEXT,
            report TEXT
        );
        CREATE TABLE logs (
            run_id TEXT NOT NULL,
            replay_id TEXT,
            stage TEXT NOT NULL,
            level TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            step INTEGER NOT NULL,
            batch_idx INTEGER,
            name TEXT NOT NULL,
            value REAL,
            text TEXT
        );
        CREATE INDEX logs_by_run ON logs (run_id, replay_id, name, epoch, step);
        CREATE INDEX logs_by_name ON logs (name, run_id);
        CREATE TABLE checkpoints (
            run_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            step INTEGER NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            write_seconds REAL NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (run_id, epoch)
        );
        CREATE TABLE epochs (
            run_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            started REAL NOT NULL,
            ended REAL NOT NULL,
            val_seconds REAL NOT NULL,
            PRIMARY KEY (run_id, epoch)
        );
        """,
    ),
    (
        "0002_replay_segments",
        """
        CREATE TABLE replay_segments (
            replay_id TEXT NOT NULL,
            segment INTEGER NOT NULL,
            segments INTEGER NOT NULL,
            rank INTEGER NOT NULL,
            pid INTEGER,
            host TEXT,
            status TEXT NOT NULL,
            epochs TEXT,
            started REAL NOT NULL,
            ended REAL,
            error TEXT,
            PRIMARY KEY (replay_id, segment)
        );
        CREATE TABLE replay_epochs (
            replay_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            action TEXT NOT NULL,
            wanted INTEGER NOT NULL
        );
        """,
    ),
    (
        # every insert paid for this index; queries by name scan the (run-ordered) table fast enough
        "0003_drop_logs_by_name",
        "DROP INDEX IF EXISTS logs_by_name;",
    ),
    (
        # where a run was started (a version replay runs its script from there), and which process
        # registered a replay (so a replay killed before any segment began can read as crashed)
        "0004_run_cwd_replay_process",
        """
        ALTER TABLE runs ADD COLUMN cwd TEXT;
        ALTER TABLE replays ADD COLUMN pid INTEGER;
        ALTER TABLE replays ADD COLUMN host TEXT;
        """,
    ),
    (
        # what the run's code snapshot left out, each with the reason (JSON: {"lightning_logs/": "..."})
        "0005_run_code_left_out",
        "ALTER TABLE runs ADD COLUMN left_out TEXT;",
    ),
    (
        # the checkpoints a replay found unusable had been kept as scratch keys ("bad_<epoch>") in its
        # report until the report itself replaced them: now they have their own table, and `report`
        # only ever holds the report
        "0006_replay_bad_checkpoints",
        """
        CREATE TABLE replay_bad_checkpoints (
            replay_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            PRIMARY KEY (replay_id, epoch)
        );
        INSERT OR IGNORE INTO replay_bad_checkpoints
            SELECT r.replay_id, CAST(substr(j.key, 5) AS INTEGER) FROM replays r, json_each(r.report) j
            WHERE json_valid(r.report) AND j.key GLOB 'bad_[0-9-]*';
        UPDATE replays SET report = NULL WHERE json_valid(report) AND json_type(report) = 'object'
            AND NOT EXISTS (SELECT 1 FROM json_each(replays.report) j WHERE j.key NOT GLOB 'bad_[0-9-]*');
        """,
    ),
    (
        # the loggers a recorded fit wrote to, each with what finds its run again (flor_lightning._trackers);
        # NULL for runs recorded before this column
        "0007_run_loggers",
        "ALTER TABLE runs ADD COLUMN loggers TEXT;",
    ),
    (
        # checkpoints stored by content (flor_lightning._blobs): the manifest's format (NULL: a torch.save
        # .ckpt of a run recorded before) and the packs it references (JSON list, names under its root), so
        # that gc and push decide by reference from the index alone
        "0009_checkpoint_blobs",
        """
        ALTER TABLE checkpoints ADD COLUMN format TEXT;
        ALTER TABLE checkpoints ADD COLUMN packs TEXT;
        """,
    ),
    (
        # checkpoints inside an epoch (at its validation points, or every N optimizer steps): batch_idx is
        # the epoch's last training batch done when it was taken, NULL for a checkpoint at an epoch's end
        # (all rows before this migration); moment says where ("validation_end", "train_batch_end").
        # The key becomes (run_id, epoch, batch_idx): rebuilt, as sqlite cannot change a primary key.
        "0010_mid_epoch_checkpoints",
        """
        CREATE TABLE checkpoints_0010 (
            run_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            step INTEGER NOT NULL,
            batch_idx INTEGER,
            moment TEXT,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            write_seconds REAL NOT NULL,
            created REAL NOT NULL,
            format TEXT,
            packs TEXT
        );
        INSERT INTO checkpoints_0010 (run_id, epoch, step, batch_idx, path, sha256, size, write_seconds, created,
                                      format, packs)
            SELECT run_id, epoch, step, NULL, path, sha256, size, write_seconds, created, format, packs
            FROM checkpoints;
        DROP TABLE checkpoints;
        ALTER TABLE checkpoints_0010 RENAME TO checkpoints;
        CREATE UNIQUE INDEX checkpoints_at ON checkpoints (run_id, epoch, ifnull(batch_idx, -1));
        """,
    ),
    (
        # a replay on several nodes: the node each segment ran on (NULL on one node), and the node stores
        # (flor_lightning._nodes) merged into this one, each once: a merge adds a store's rows and its row
        # here in one transaction, so a merge run again (or after a kill) adds nothing twice
        "0011_replay_nodes",
        """
        ALTER TABLE replay_segments ADD COLUMN node INTEGER;
        CREATE TABLE replay_merges (
            replay_id TEXT NOT NULL,
            source TEXT NOT NULL,
            rows INTEGER NOT NULL,
            merged REAL NOT NULL,
            PRIMARY KEY (replay_id, source)
        );
        """,
    ),
)

LOG_COLUMNS = ("run_id", "replay_id", "stage", "level", "epoch", "step", "batch_idx", "name", "value", "text")


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) the log store at ``path`` and bring its schema up to date.

    A file that is not flor's is left exactly as it was: it is recognised before anything is
    written (not even the switch to WAL mode). A store whose schema is up to date is opened
    without taking the write lock, so readers never wait for (or hold up) a recording.

    With ``readonly`` the file is opened for reading only (nothing is created), so a store whose
    file or folder is read-only (an archive) can still be queried; only an older schema is
    brought up to date first, which needs write access once.

    Raises:
        StoreError: the file is not a sqlite database, belongs to another program, is damaged,
            or its folder cannot be created; the message says which and what to do.
    """
    path = Path(path)
    if readonly:
        return _connect_readonly(path)
    conn: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        _check_ours(conn)
        _use_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        _migrate(conn)
    except (sqlite3.DatabaseError, OSError, StoreError) as err:
        if conn is not None:
            conn.close()
        if isinstance(err, StoreError):  # a migration's own failure, already named (immediate())
            raise
        raise store_error(path, err) from err
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(read_uri(path), uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        _check_ours(conn)
        if _pending(conn):  # an older schema (or an empty file): brought up to date once, by a writer
            conn.close()
            connect(path).close()
            conn = sqlite3.connect(read_uri(path), uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    except sqlite3.DatabaseError as err:
        if conn is not None:
            conn.close()
        raise store_error(path, err) from err
    return conn


def read_uri(path: Path | str) -> str:
    """A sqlite URI that opens ``path`` for reading only.

    A store in WAL mode is read through its ``-shm`` file, which a reader that may not write the
    folder (an archived, read-only store) cannot create; such a store is opened ``immutable``:
    nobody without write access to the folder can be changing it either.
    """
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError as err:  # only "cannot make the -shm file": a lock or damage is no reason
        if getattr(err, "sqlite_errorname", "").startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
            return f"{uri}&immutable=1"
    return uri


def store_error(path: Path | str, err: BaseException) -> StoreError:
    """The one-line error for ``err`` met on the store at ``path``: what went wrong and what to do."""
    where, text = repr(str(path)), str(err)
    folder = Path(path).parent
    if isinstance(err, OSError):  # the folder could not be made: a file is in the way, no permission
        return StoreError(
            f"cannot create the folder {str(folder)!r} of the flor log store {where}: {err}. "
            "Point FLOR_DB (or --db) at a file in a folder you can write."
        )
    if "readonly" in text or ("unable to open" in text and not os.access(folder, os.W_OK)):
        return StoreError(
            f"the flor log store {where} is read-only ({err}); recording, replay, gc and push write to it. "
            "Make the file and its folder writable (chmod u+w), or set FLOR_DB to a writable copy; "
            "flor runs, query and show read it as it is."
        )
    if "locked" in text or "busy" in text:
        return StoreError(f"the flor log store {where} stayed locked by another process ({err}); try again later.")
    return StoreError(
        f"cannot open the flor log store {where}: {err}. If the file is damaged or not flor's, move it aside "
        "(flor starts a new store there) or set FLOR_DB to another path; `sqlite3 FILE .recover` may save "
        "the values of a damaged one."
    )


def check_writable(conn: sqlite3.Connection, path: Path | str) -> None:
    """Prove the store at ``path`` can be written and is whole (sqlite's quick structural check),
    before a recording or replay makes anything (a code snapshot, a checkpoint folder).

    Raises:
        StoreError: it is read-only or damaged (the message says which and what to do).
    """
    try:
        # a row written and rolled back: in WAL mode sqlite grants BEGIN IMMEDIATE on a read-only file
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT INTO flor_migrations VALUES ('(write probe)', 0)")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as err:
        raise store_error(path, err) from err
    if verdict != "ok":
        raise store_error(path, sqlite3.DatabaseError(f"it is damaged ({verdict})"))


def _use_wal(conn: sqlite3.Connection, *, timeout: float = 30.0) -> None:
    """Put the database in WAL mode (stored in the file, so this changes it once).

    sqlite answers "database is locked" at once, without waiting, when another connection holds
    a lock as the mode changes: two processes creating the store at the same moment met it.
    So the switch is retried until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
            locked: sqlite3.OperationalError | None = None
        except sqlite3.OperationalError as err:
            if not _locked(err):
                raise
            locked = err
        if time.monotonic() > deadline:
            raise locked or sqlite3.OperationalError("could not switch the store to WAL mode: it stayed busy")
        time.sleep(0.01)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _check_ours(conn: sqlite3.Connection) -> None:
    """Raise unless the database is empty or flor's (a read: it changes nothing)."""
    tables = _tables(conn)
    if tables and "flor_migrations" not in tables:
        raise sqlite3.DatabaseError(f"it holds tables flor did not create: {sorted(tables)}")


def _pending(conn: sqlite3.Connection) -> bool:
    """Whether a migration has yet to run (a read: it changes nothing)."""
    if "flor_migrations" not in _tables(conn):
        return True
    done = {r[0] for r in conn.execute("SELECT name FROM flor_migrations")}
    return not all(name in done for name, _ in MIGRATIONS)


def _migrate(conn: sqlite3.Connection) -> None:
    if not _pending(conn):
        return  # up to date: no write lock needed
    with immediate(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS flor_migrations (name TEXT PRIMARY KEY, applied REAL)")
        tables = _tables(conn)
        done = {r[0] for r in conn.execute("SELECT name FROM flor_migrations")}
        if not done and tables - {"flor_migrations"}:
            raise sqlite3.DatabaseError(f"it holds tables flor did not create: {sorted(tables)}")
        for name, sql in MIGRATIONS:
            if name not in done:
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO flor_migrations VALUES (?, julianday('now'))", (name,))


def encode_value(value: Any) -> tuple[float | None, str | None]:
    """Split a logged value into the (value, text) columns.

    Numbers (and one-element tensors/arrays) go to ``value``; NaN is stored as text 'nan'
    because sqlite turns a NaN REAL into NULL; anything else is stored as its text.
    """
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars (no torch import: `flor` stays quick)
        value = value.tolist()
        while isinstance(value, list) and len(value) == 1:  # a one-element tensor is its element
            value = value[0]
    if isinstance(value, bool):
        return float(value), None
    if isinstance(value, (int, float)):
        return (None, "nan") if math.isnan(value) else (float(value), None)
    return None, value if isinstance(value, str) else json.dumps(value, default=repr)


def decode_value(value: float | None, text: str | None) -> Any:
    """Inverse of :func:`encode_value` for one row."""
    if value is not None:
        return value
    if text == "nan":
        return math.nan
    return text


class LogWriter:
    """Batches log rows in memory and writes them from a background thread.

    ``add`` is a deque append (atomic, no lock, no I/O); the thread flushes every ``interval`` seconds
    and whenever :meth:`flush` is called. Rows are written in one transaction per batch, so a
    process killed at any moment leaves every earlier batch complete and no partial one. A store
    locked by another process past sqlite's busy timeout (a long query, a browser holding a write
    transaction) loses nothing and fails nothing: the batch is kept and written again, in order,
    once the lock is gone (warned once per lock); a :meth:`flush` that waits waits for that.

    Args:
        connect_fn: opens the sqlite connection (called once, inside the writer thread).
        interval: seconds between automatic flushes.
    """

    def __init__(self, connect_fn: Callable[[], sqlite3.Connection], *, interval: float = 1.0) -> None:
        self._connect = connect_fn
        self._interval = interval
        self._pending: deque[tuple[Any, ...]] = deque()
        self._unwritten: list[tuple[Any, ...]] = []  # encoded rows of a batch the store was locked for
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._requested = 0
        self._done = 0
        self._closing = False
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0  # CPU time of the writer thread's flushes
        self._thread = threading.Thread(target=self._loop, name="flor-log-writer", daemon=True)
        self._thread.start()

    def add(self, row: tuple[Any, ...]) -> None:
        """Queue one row ``(run_id, replay_id, stage, level, epoch, step, batch_idx, name, raw_value)``."""
        self._pending.append(row)

    def add_batch(self, context: tuple[Any, ...], names_values: list[Any]) -> None:
        """Queue the rows of one batch at once: ``context`` is ``(run_id, replay_id, stage, level, epoch,
        step, batch_idx)`` and ``names_values`` is flat, ``[name, raw_value, name, raw_value, ...]``."""
        self._pending.append((*context, names_values))

    @property
    def backlog(self) -> int:
        """Rows queued and not yet written."""
        queued = sum(1 if len(item) == len(LOG_COLUMNS) - 1 else len(item[-1]) // 2 for item in list(self._pending))
        return len(self._unwritten) + queued

    def flush(self, *, wait: bool = True) -> None:
        """Write everything queued so far; with ``wait`` block until it is committed."""
        with self._flushed:
            self._requested += 1
            ticket = self._requested
        self._wake.set()
        if wait:
            with self._flushed:
                self._flushed.wait_for(lambda: self._done >= ticket or not self._thread.is_alive())
            self._raise_if_failed()

    def close(self) -> None:
        """Flush, stop the thread and raise any error the thread met."""
        self._closing = True
        self.flush()
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"the flor log writer failed: {self._error}") from self._error

    def _loop(self) -> None:
        try:
            conn = self._connect()
        except BaseException as err:  # reported to the training thread at the next flush
            self._error = err
            return
        try:
            while True:
                self._wake.wait(min(self._interval, 0.5) if self._unwritten else self._interval)
                self._wake.clear()
                with self._flushed:
                    ticket = self._requested
                cpu = time.thread_time()
                self._write(conn)
                self.cpu_seconds += time.thread_time() - cpu
                if self._unwritten:  # the store was locked: that batch is written again next time
                    continue
                with self._flushed:
                    self._done = ticket
                    self._flushed.notify_all()
                if self._closing and ticket == self._requested:
                    return
        except BaseException as err:
            self._error = err
        finally:
            conn.close()
            with self._flushed:
                self._flushed.notify_all()

    def _write(self, conn: sqlite3.Connection) -> None:
        # popleft, not a list swap: an append racing with the swap could land in a list already written.
        pending = self._pending
        rows, self._unwritten = self._unwritten, []
        retrying = bool(rows)
        for item in [pending.popleft() for _ in range(len(pending))]:
            if len(item) == len(LOG_COLUMNS) - 1:  # one row
                rows.append((*item[:8], *encode_value(item[8])))
            else:  # one batch: a context and its flat names and values
                context, flat = item[:7], item[7]
                rows += [(*context, flat[i], *encode_value(flat[i + 1])) for i in range(0, len(flat), 2)]
        if not rows:
            return
        try:
            with immediate(conn):
                _insert_rows(conn, rows)
        except StoreError as err:
            if not _locked(err.__cause__):
                raise
            if not retrying:
                path = conn.execute("PRAGMA database_list").fetchone()[2]
                warnings.warn(
                    f"flor: the log store {path!r} is locked by another process ({err.__cause__}); "
                    f"its {len(rows)} values are kept and written once it is free",
                    stacklevel=1,
                )
            self._unwritten = rows


def _locked(err: BaseException | None) -> bool:
    """Is ``err`` sqlite's "database is locked"/"busy": another connection holds the write lock?"""
    return isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err))


# A flush inserts 99 rows per statement. sqlite3 releases and retakes the GIL for each statement
# it runs, and beside a training thread one row per statement cost the writer 44-45 µs of CPU
# per value against 17 (W3); one statement over a JSON array of the rows costs as little there
# but 12 µs per value alone against 8.5 (SQLite parses each row's JSON again for every column).
_ROWS_PER_INSERT = 99  # 990 parameters: under the 999 that SQLite before 3.32 allows


@functools.cache
def _insert_sql(n: int) -> str:
    row = f"({', '.join('?' * len(LOG_COLUMNS))})"
    return f"INSERT INTO logs VALUES {', '.join([row] * n)}"


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` of :data:`LOG_COLUMNS` into ``logs``, :data:`_ROWS_PER_INSERT` per statement."""
    n = _ROWS_PER_INSERT
    full = len(rows) - len(rows) % n
    if full:
        conn.executemany(_insert_sql(n), ([v for r in rows[i : i + n] for v in r] for i in range(0, full, n)))
    if full < len(rows):
        conn.execute(_insert_sql(len(rows) - full), [v for r in rows[full:] for v in r])


def insert(conn: sqlite3.Connection, table: str, row: dict[str, Any], *, replace: bool = True) -> None:
    """Insert one row given as a dict (replacing one with the same key, or keeping it when
    ``replace`` is False); dict/list values are stored as JSON."""
    cols = ", ".join(row)
    marks = ", ".join("?" * len(row))
    values = [json.dumps(v, default=repr) if isinstance(v, (dict, list)) else v for v in row.values()]
    verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
    with _reported(conn):  # one statement: atomic by itself, and part of an enclosing immediate() transaction
        conn.execute(f"{verb} INTO {table} ({cols}) VALUES ({marks})", values)


def update(conn: sqlite3.Connection, table: str, key: dict[str, Any], values: dict[str, Any]) -> None:
    """Update the row of ``table`` matching ``key`` with ``values``."""
    sets = ", ".join(f"{c} = ?" for c in values)
    where = " AND ".join(f"{c} = ?" for c in key)
    params = [json.dumps(v, default=repr) if isinstance(v, (dict, list)) else v for v in values.values()]
    with _reported(conn):  # one statement: atomic by itself, and part of an enclosing immediate() transaction
        conn.execute(f"UPDATE {table} SET {sets} WHERE {where}", [*params, *key.values()])


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction taken at once (``BEGIN IMMEDIATE``): no other process writes between its
    reads and its writes; everything inside it (:func:`insert` and :func:`update` too) commits or
    rolls back together. This is the store's one way to group statements: each statement outside it
    commits by itself (the connection is in autocommit mode). A sqlite error is raised as a
    :class:`StoreError` naming the file."""
    with _reported(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def fetch(conn: sqlite3.Connection, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
    """Rows of a query as dicts."""
    with _reported(conn):
        cur = conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


@contextmanager
def _reported(conn: sqlite3.Connection) -> Iterator[None]:
    """Turn a sqlite error (a damaged page, a read-only file) into a :class:`StoreError` naming the file."""
    try:
        yield
    except sqlite3.DatabaseError as err:
        try:
            path = conn.execute("PRAGMA database_list").fetchone()[2]
        except sqlite3.Error:
            path = "(the log store)"
        raise store_error(path, err) from err


def placeholders(values: Iterable[Any]) -> str:
    """``?, ?, ?`` for an IN clause over ``values``."""
    return ", ".join("?" for _ in values)
