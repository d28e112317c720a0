"""Choosing the run a replay replays, from a real sqlite file with rows written by hand."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._errors import ReplayError, UnknownRunError
from flor_lightning._locate import Location


def add_run(conn: sqlite3.Connection, run_id: str, started: float, script: str | None = "train.py") -> None:
    store.insert(conn, "runs", {"run_id": run_id, "project": "p", "script": script, "started": started, "status": "x"})


def add_checkpoint(conn: sqlite3.Connection, run_id: str, epoch: int) -> None:
    row = {"path": f"{run_id}/{epoch}.ckpt", "sha256": "0" * 64, "size": 1, "write_seconds": 0.5, "created": 1.0}
    store.insert(conn, "checkpoints", {"run_id": run_id, "epoch": epoch, "step": 10 * (epoch + 1), **row})


def add_epoch(conn: sqlite3.Connection, run_id: str, epoch: int) -> None:
    row = {"started": float(epoch), "ended": epoch + 1.0, "val_seconds": 0.25}
    store.insert(conn, "epochs", {"run_id": run_id, "epoch": epoch, **row})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / ".flor" / "flor.db"


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    db.parent.mkdir()
    with closing(store.connect(db)) as c:
        yield c


def test_the_latest_run_of_the_script_with_checkpoints_is_chosen(conn):
    add_run(conn, "old", 1.0)
    add_run(conn, "mid", 2.0)
    add_run(conn, "new", 3.0)  # no checkpoint: killed before its first one
    add_run(conn, "other", 4.0, script="other.py")
    for run_id in ("old", "mid", "other"):
        add_checkpoint(conn, run_id, 0)
    assert _runs.find_run(conn, None, "train.py")["run_id"] == "mid"
    assert _runs.find_run(conn, "old", "train.py")["run_id"] == "old"  # a given id wins, whatever its script


def test_without_checkpoints_left_the_latest_run_with_a_finished_epoch_is_chosen(conn):
    add_run(conn, "a", 1.0)
    add_run(conn, "b", 2.0)
    add_run(conn, "c", 3.0)  # no epoch finished
    add_epoch(conn, "a", 0)
    add_epoch(conn, "b", 0)
    assert _runs.find_run(conn, None, "train.py")["run_id"] == "b"


def test_no_run_of_the_script_says_how_to_record_one(conn):
    add_run(conn, "a", 1.0, script="other.py")
    add_checkpoint(conn, "a", 0)
    with pytest.raises(ReplayError, match=r"no recorded run of 'train.py' with checkpoints.*pass run='<id>'"):
        _runs.find_run(conn, None, "train.py")


def test_an_unknown_run_id_names_the_latest_runs(conn):
    add_run(conn, "a", 1.0)
    with pytest.raises(UnknownRunError) as info:
        _runs.find_run(conn, "nope", "train.py")
    assert info.value.latest == ["a"]


def test_load_run_gives_the_run_its_checkpoints_by_epoch_and_its_epochs_in_order(db, conn, tmp_path):
    add_run(conn, "a", 1.0, script="train.py")
    for epoch in (1, -1, 0):
        add_checkpoint(conn, "a", epoch)
    for epoch in (1, 0):
        add_epoch(conn, "a", epoch)
    add_checkpoint(conn, "elsewhere", 0)
    loc = Location(root=tmp_path, in_git=False, db_path=db, project="p")

    run, checkpoints, epochs = _runs.load_run(loc, "a")

    assert run["run_id"] == "a"
    assert sorted(checkpoints) == [-1, 0, 1] and checkpoints[1]["path"] == "a/1.ckpt"
    assert [e["epoch"] for e in epochs] == [0, 1]


def test_load_run_without_a_store_says_to_record_first_and_makes_none(tmp_path):
    loc = Location(root=tmp_path, in_git=False, db_path=tmp_path / ".flor" / "flor.db", project="p")
    with pytest.raises(ReplayError, match="nothing to replay: no flor log store at"):
        _runs.load_run(loc, None)
    assert not (tmp_path / ".flor").exists()
