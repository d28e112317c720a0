"""The sqlite log store: schema, migrations, typed values, the background writer."""

from __future__ import annotations

import math
import sqlite3
import threading
from contextlib import closing

import pytest
import torch

from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._errors import StoreError


def test_connect_creates_wal_store_with_migrations(tmp_path):
    conn = store.connect(tmp_path / "sub" / "flor.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in conn.execute("SELECT name FROM flor_migrations")]
    assert names == [name for name, _ in store.MIGRATIONS]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "logs", "checkpoints", "replays", "epochs"} <= tables
    conn.close()
    # reopening applies nothing twice
    conn = store.connect(tmp_path / "sub" / "flor.db")
    assert conn.execute("SELECT count(*) FROM flor_migrations").fetchone()[0] == len(store.MIGRATIONS)


def test_a_store_of_an_older_release_is_brought_up_to_date_keeping_its_rows(tmp_path, monkeypatch):
    path = tmp_path / "flor.db"
    monkeypatch.setattr(store, "MIGRATIONS", store.MIGRATIONS[:3])  # as the release before 0004 made it
    with closing(store.connect(path)) as conn:
        store.insert(conn, "runs", {"run_id": "r1", "project": "p", "started": 1.0, "status": "finished"})
        store.insert(conn, "replays", {"replay_id": "r1.x", "run_id": "r1", "started": 2.0, "status": "running"})
    monkeypatch.undo()

    with closing(store.connect(path)) as conn:
        [run] = store.fetch(conn, "SELECT run_id, status, cwd FROM runs")
        [replay] = store.fetch(conn, "SELECT replay_id, pid, host FROM replays")
        assert run == {"run_id": "r1", "status": "finished", "cwd": None}
        assert replay == {"replay_id": "r1.x", "pid": None, "host": None}
        # which process registered the replay is unknown: it is kept as possibly running
        assert _runs.replay_alive(conn, "r1.x", "this-host")


def test_migration_0006_moves_bad_checkpoint_marks_out_of_the_report(tmp_path, monkeypatch):
    """Before 0006 a replay kept the checkpoints it found unusable as ``bad_<epoch>`` keys in its report
    until the report replaced them; a replay killed meanwhile left only those keys there."""
    path = tmp_path / "flor.db"
    before = tuple(m for m in store.MIGRATIONS if m[0] != "0006_replay_bad_checkpoints")
    monkeypatch.setattr(store, "MIGRATIONS", before)
    with closing(store.connect(path)) as conn:
        store.insert(conn, "runs", {"run_id": "r1", "project": "p", "started": 1.0, "status": "finished"})
        for replay_id, report in [("r1.killed", '{"bad_3": 1, "bad_5": 1}'), ("r1.done", '{"bad_checkpoints": [2]}')]:
            row = {"replay_id": replay_id, "run_id": "r1", "started": 2.0, "status": "running", "report": report}
            store.insert(conn, "replays", row)
        odd = {"replay_id": "r1.odd", "run_id": "r1", "started": 3.0, "status": "failed", "report": "Infinity"}
        store.insert(conn, "replays", odd)  # not JSON to sqlite (json.dumps writes it for an infinite float)
    monkeypatch.undo()

    with closing(store.connect(path)) as conn:
        marks = store.fetch(conn, "SELECT replay_id, epoch FROM replay_bad_checkpoints ORDER BY epoch")
        assert marks == [{"replay_id": "r1.killed", "epoch": 3}, {"replay_id": "r1.killed", "epoch": 5}]
        reports = {r["replay_id"]: r["report"] for r in store.fetch(conn, "SELECT replay_id, report FROM replays")}
        assert reports == {"r1.killed": None, "r1.done": '{"bad_checkpoints": [2]}', "r1.odd": "Infinity"}


def test_migration_0010_keeps_epoch_checkpoints_and_keys_them_by_batch_too(tmp_path, monkeypatch):
    """Rows from before 0010 are checkpoints at epoch ends (batch_idx NULL); afterwards a run holds one
    row per epoch end and one per checkpoint inside an epoch, each replaced only by its own kind."""
    path = tmp_path / "flor.db"
    monkeypatch.setattr(store, "MIGRATIONS", tuple(m for m in store.MIGRATIONS if m[0] < "0010"))
    row = {"run_id": "r1", "epoch": 0, "step": 4, "path": "/c/e0", "sha256": "a", "size": 1}
    with closing(store.connect(path)) as conn:
        blobs = {"format": "manifest", "packs": ["packs/p1.safetensors"]}  # 0009's columns survive the rebuild
        store.insert(conn, "checkpoints", {**row, "write_seconds": 0.1, "created": 1.0, **blobs})
    monkeypatch.undo()

    with closing(store.connect(path)) as conn:
        assert store.fetch(conn, "SELECT epoch, step, batch_idx, path, format, packs FROM checkpoints") == [
            {
                "epoch": 0,
                "step": 4,
                "batch_idx": None,
                "path": "/c/e0",
                "format": "manifest",
                "packs": '["packs/p1.safetensors"]',
            }
        ]
        inside = {**row, "step": 2, "batch_idx": 1, "path": "/c/e0b1", "write_seconds": 0.1, "created": 2.0}
        store.insert(conn, "checkpoints", inside)
        store.insert(conn, "checkpoints", {**inside, "path": "/c/e0b1-again"})  # the same moment: replaced
        got = store.fetch(conn, "SELECT batch_idx, path FROM checkpoints ORDER BY step")
        assert got == [{"batch_idx": 1, "path": "/c/e0b1-again"}, {"batch_idx": None, "path": "/c/e0"}]


def test_connect_rejects_garbage_and_foreign_databases(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="move it aside"):
        store.connect(garbage)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE customers (id INTEGER)").connection.commit()
    with pytest.raises(StoreError, match="flor did not create"):
        store.connect(foreign)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (3, 3.0),
        (2.5, 2.5),
        (True, 1.0),
        (torch.tensor(1.25), 1.25),
        (torch.tensor([7.0]), 7.0),
        (float("inf"), float("inf")),
        ("hello", "hello"),
        (torch.tensor([1.0, 2.0]), "[1.0, 2.0]"),
    ],
)
def test_values_round_trip_typed(raw, expected):
    assert store.decode_value(*store.encode_value(raw)) == expected


def test_nan_survives_sqlite(tmp_path):
    conn = store.connect(tmp_path / "f.db")
    conn.execute(
        "INSERT INTO logs VALUES ('r', NULL, 'train', 'step', 0, 0, 0, 'x', ?, ?)", store.encode_value(math.nan)
    )
    value, text = conn.execute("SELECT value, text FROM logs").fetchone()
    assert math.isnan(store.decode_value(value, text))


def test_writer_batches_and_flushes_everything(tmp_path):
    path = tmp_path / "f.db"
    store.connect(path).close()
    writer = store.LogWriter(lambda: store.connect(path), interval=60)

    def produce(k: int) -> None:
        for i in range(5000):
            writer.add(("r", None, "train", "step", 0, i, i, f"m{k}", float(i)))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    writer.flush()  # racing with the producers: nothing may be lost
    for t in threads:
        t.join()
    writer.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM logs").fetchone()[0] == 15000
    assert conn.execute("SELECT count(DISTINCT step) FROM logs WHERE name='m1'").fetchone()[0] == 5000


def test_writer_takes_a_batch_of_values_as_one_item_in_order(tmp_path):
    path = tmp_path / "f.db"
    store.connect(path).close()
    writer = store.LogWriter(lambda: store.connect(path), interval=60)
    writer.add(("r", None, "train", "step", 0, 0, 0, "a", 1.0))
    writer.add_batch(("r", None, "train", "step", 0, 1, 1), ["a", torch.tensor(2.0), "b", 3])
    writer.add(("r", None, "train", "epoch", 0, 1, None, "a_epoch", 1.5))
    assert writer.backlog == 4  # rows, not items
    writer.close()
    rows = sqlite3.connect(path).execute("SELECT step, batch_idx, name, value FROM logs ORDER BY rowid").fetchall()
    assert rows == [(0, 0, "a", 1.0), (1, 1, "a", 2.0), (1, 1, "b", 3.0), (1, None, "a_epoch", 1.5)]


def test_writer_stores_every_kind_of_value_exactly(tmp_path):
    """Values of every kind come back as they went in, in order, from flushes of one row, of
    fewer rows than one insert statement takes, and of several statements' worth."""
    path = tmp_path / "f.db"
    store.connect(path).close()
    writer = store.LogWriter(lambda: store.connect(path), interval=60)
    plain = [0.1 + 0.2, 1e-320, -2.5e300, 3, True, math.nan, "é😀", [1, 2], None]
    odd = [math.inf, -math.inf, "a\x00b", "a \\u0000 b"]
    many = [float(i) for i in range(2 * store._ROWS_PER_INSERT + 5)]
    for i, values in enumerate((plain, odd, many)):
        writer.add_batch(("r", None, "train", "step", 0, i, None), [x for v in values for x in ("m", v)])
        writer.flush()
    writer.add(("r", None, "train", "step", 0, 3, 7, "one", 4.5))
    writer.close()
    rows = sqlite3.connect(path).execute("SELECT run_id, step, batch_idx, value, text FROM logs ORDER BY rowid")
    rows = rows.fetchall()
    assert [r[:2] for r in rows] == [("r", i) for i, vs in enumerate((plain, odd, many, [0])) for _ in vs]
    decoded = [store.decode_value(v, t) for *_, v, t in rows]
    assert math.isnan(decoded.pop(5))
    assert decoded == [0.1 + 0.2, 1e-320, -2.5e300, 3.0, 1.0, "é😀", "[1, 2]", "null", *odd, *many, 4.5]
    assert rows[-1][2] == 7


def test_writer_flushes_on_its_own_interval(tmp_path):
    path = tmp_path / "f.db"
    store.connect(path).close()
    writer = store.LogWriter(lambda: store.connect(path), interval=0.05)
    writer.add(("r", None, "train", "step", 0, 0, 0, "x", 1.0))
    reader = sqlite3.connect(path)
    for _ in range(200):
        if reader.execute("SELECT count(*) FROM logs").fetchone()[0] == 1:
            break
        threading.Event().wait(0.02)
    assert reader.execute("SELECT count(*) FROM logs").fetchone()[0] == 1
    writer.close()


def test_writer_reports_a_failure_to_the_caller(tmp_path):
    def broken() -> sqlite3.Connection:
        raise OSError("disk on fire")

    writer = store.LogWriter(broken, interval=60)
    with pytest.raises(StoreError, match="disk on fire"):
        writer.close()


def test_writer_keeps_values_while_another_process_holds_the_lock(tmp_path):
    """A store locked past the busy timeout (another process in a write transaction) fails
    nothing and loses nothing: the batch is written, in order, once the lock is gone."""
    path = tmp_path / "f.db"
    store.connect(path).close()

    def impatient() -> sqlite3.Connection:
        conn = store.connect(path)
        conn.execute("PRAGMA busy_timeout = 50")
        return conn

    writer = store.LogWriter(impatient, interval=60)
    writer.add(("r", None, "train", "step", 0, 0, 0, "x", 1.0))
    writer.flush()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer.add(("r", None, "train", "step", 0, 1, 1, "x", 2.0))
    with pytest.warns(UserWarning, match="locked by another process.*1 values are kept"):
        writer.flush(wait=False)
        for _ in range(200):
            if writer._unwritten:
                break
            threading.Event().wait(0.02)
    assert writer.backlog == 1
    writer.add(("r", None, "train", "step", 0, 2, 2, "x", 3.0))
    threading.Event().wait(0.3)  # retried under the lock at least once
    other.execute("ROLLBACK")
    writer.close()
    rows = sqlite3.connect(path).execute("SELECT step, value FROM logs ORDER BY rowid").fetchall()
    assert rows == [(0, 1.0), (1, 2.0), (2, 3.0)]
