"""Processes sharing one project at once: two recordings, a replay beside a recording, queries
during a recording. Each is a real process (forked from the zygote) on one real sqlite store and
one real git repository."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import git, rows
from models import TRAIN_BATCHES, VAL_BATCHES
from zygote import Child, Zygote

import flor_lightning as flor
from flor_lightning import _store as store
from flor_lightning._shadow import SHADOW_BRANCH

pytestmark = pytest.mark.integration

EPOCHS = 3
# per epoch: train_loss per step and its epoch mean; val_loss and val_acc per batch and their means
VALUES_PER_EPOCH = TRAIN_BATCHES + 1 + 2 * VAL_BATCHES + 2
KEY = ["run_id", "replay_id", "stage", "level", "epoch", "step", "batch_idx", "name"]


def start(zygote: Zygote, project: Path, tmp_path: Path, name: str, target: str = "record", **kwargs: Any) -> Child:
    return zygote.fork(target, cwd=project, log=tmp_path / f"{name}.log", out=str(tmp_path / f"{name}.json"), **kwargs)


def finish(zygote: Zygote, child: Child, tmp_path: Path, name: str) -> dict[str, Any]:
    ended = zygote.wait(child, timeout=120)
    assert ended.code == 0, f"{name} ended with {ended}:\n{child.log_tail()}"
    result: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    return result


def recorded(run_id: str) -> pd.DataFrame:
    """The run's recorded values, without the run id, in the order they were logged."""
    rec = flor.records(run=run_id)
    return rec[rec["replay_id"].isna()].drop(columns="run_id").reset_index(drop=True)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_two_recordings_at_once_store_every_value_once(project: Path, zygote: Zygote, tmp_path: Path) -> None:
    # a fresh project: both processes create the store and the shadow branch at the same moment
    at, gate = time.time() + 0.5, tmp_path / "gate"
    a, b = (start(zygote, project, tmp_path, name, start_at=at, gate=str(gate)) for name in ("a", "b"))
    for child in (a, b):  # each holds after its first epoch until both are there: their spans overlap for certain
        assert zygote.wait_event(child, lambda e: e == "epoch-end 0", timeout=60) is not None, child.log_tail()
    gate.touch()
    runs_ab = [finish(zygote, child, tmp_path, name)["run_id"] for child, name in ((a, "a"), (b, "b"))]
    alone = finish(zygote, start(zygote, project, tmp_path, "alone"), tmp_path, "alone")["run_id"]

    db = project / ".flor" / "flor.db"
    spans = {r["run_id"]: (r["started"], r["ended"]) for r in rows(db, "SELECT run_id, started, ended FROM runs")}
    assert overlap(spans[runs_ab[0]], spans[runs_ab[1]])  # they did record at the same time
    runs = flor.runs()
    assert len(runs) == 3 and set(runs["status"]) == {"finished"}
    expected = recorded(alone)
    assert len(expected) == EPOCHS * VALUES_PER_EPOCH
    assert not flor.records().duplicated(KEY).any()
    for run_id in runs_ab:  # same seed, one thread each: the same values, bit for bit, each once
        pd.testing.assert_frame_equal(recorded(run_id), expected)
    commits = list(runs["shadow_commit"])
    assert len(set(commits)) == 3
    on_branch = git(project, "rev-list", SHADOW_BRANCH).split()
    assert set(commits) == set(on_branch)  # no ref update lost to the other process


def test_replay_beside_a_new_recording(project: Path, zygote: Zygote, tmp_path: Path) -> None:
    first = finish(zygote, start(zygote, project, tmp_path, "first"), tmp_path, "first")["run_id"]
    gate = tmp_path / "gate"  # the second recording holds after its first epoch until the replay is done
    recording = start(zygote, project, tmp_path, "second", gate=str(gate))
    held = zygote.wait_event(recording, lambda e: e == "epoch-end 0", timeout=60)
    assert held is not None, recording.log_tail()
    report = finish(
        zygote, start(zygote, project, tmp_path, "replay", target="replay", run_id=first), tmp_path, "replay"
    )
    gate.touch()
    second = finish(zygote, recording, tmp_path, "second")["run_id"]

    assert report["new_names"] == ["val_conf"]
    assert report["new_values"] == EPOCHS * (VAL_BATCHES + 1)
    assert report["rederived"] > 0 and report["matched"] == report["rederived"] and report["mismatched"] == 0
    replayed = flor.records(run=first)
    replayed = replayed[replayed["replay_id"] == report["replay_id"]]
    assert len(replayed) == report["rederived"] + report["new_values"]
    assert not flor.records().duplicated(KEY).any()
    pd.testing.assert_frame_equal(recorded(second), recorded(first))
    db = project / ".flor" / "flor.db"
    (done,) = rows(db, "SELECT status, started, ended FROM replays")
    assert done["status"] == "finished"
    (run,) = rows(db, "SELECT started, ended FROM runs WHERE run_id = ?", (second,))
    assert run["started"] < done["started"] and done["ended"] < run["ended"]  # the replay ran inside the recording
    assert set(flor.runs()["status"]) == {"finished"}


def test_query_during_a_recording_is_consistent(project: Path, zygote: Zygote, tmp_path: Path) -> None:
    epochs = 30
    child = start(zygote, project, tmp_path, "long", max_epochs=epochs, flush_interval=0.05)
    assert zygote.wait_event(child, lambda e: e.startswith("run "), timeout=60) is not None, child.log_tail()
    polls, last = 0, 0
    last_epoch = f"epoch-end {epochs - 1}"
    while child.alive and zygote.wait_event(child, lambda e: e == last_epoch, timeout=0) is None:
        rec = flor.records()  # no exception while the recorder writes
        table = flor.query()
        run_ids = set(flor.runs()["run_id"])
        assert set(rec["run_id"]) <= run_ids and set(table["run_id"]) <= run_ids  # no value without its run
        assert len(rec) >= last  # what was visible stays visible
        assert not rec.duplicated(KEY).any()
        polls += len(rec) > last
        last = len(rec)
    finish(zygote, child, tmp_path, "long")

    assert polls >= 5  # the queries did see the recording grow
    assert len(flor.records()) == epochs * VALUES_PER_EPOCH
    assert len(flor.query()) == epochs * (TRAIN_BATCHES + 1)


def test_readers_never_wait_for_a_write_in_progress(project: Path) -> None:
    """Opening the store for a query takes no write lock (it did: a query then waited up to 30 s
    behind any write transaction, and held up the recorder's log writer while it migrated)."""
    db = project / ".flor" / "flor.db"
    setup = store.connect(db)
    store.insert(setup, "runs", {"run_id": "r", "project": "proj", "started": 1.0, "status": "finished"})
    setup.execute("INSERT INTO logs VALUES ('r', NULL, 'train', 'step', 0, 0, 0, 'loss', 1.5, NULL)")
    setup.close()
    writer = store.connect(db)
    writer.execute("BEGIN IMMEDIATE")  # a recorder in the middle of a batch
    writer.execute("INSERT INTO logs VALUES ('r', NULL, 'train', 'step', 0, 1, 1, 'loss', 2.5, NULL)")
    try:
        assert flor.query("loss")["loss"].tolist() == [1.5]  # the committed value, at once
        assert len(flor.runs()) == 1
    finally:
        writer.execute("COMMIT")
        writer.close()
    assert flor.query("loss")["loss"].tolist() == [1.5, 2.5]


class LockedAtFirst:
    """A connection whose first journal-mode switches meet another process's lock, as sqlite
    reports them when it cannot wait (no busy handler for this pragma). The real race, two
    processes creating the store at once, is what test_two_recordings_at_once... met now and then."""

    def __init__(self, conn: sqlite3.Connection, failures: int) -> None:
        self.conn, self.failures = conn, failures

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith("PRAGMA journal_mode") and self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return self.conn.execute(sql, *args)


def test_switch_to_wal_waits_for_another_process_creating_the_store(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    store._use_wal(LockedAtFirst(conn, failures=3))  # type: ignore[arg-type]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()

    conn = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):  # a lock never released: gives up
        store._use_wal(LockedAtFirst(conn, failures=10**9), timeout=0.1)  # type: ignore[arg-type]
    conn.close()
