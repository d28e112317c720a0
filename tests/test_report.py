"""The replay report: comparison, epochs, replacing unfinished replays, storing it (real sqlite, rows by hand)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from helpers import rows

from flor_lightning import _store as store
from flor_lightning._report import (
    ReplayReport,
    cause,
    compare,
    fill_epochs,
    replace_unfinished,
    store_report,
)

RUN = "run1"


def log(
    conn: sqlite3.Connection, name: str, value: float | None, *, replay: str | None = None, **where: object
) -> None:
    row = {"stage": "val", "level": "epoch", "epoch": 0, "step": 10, "batch_idx": None, **where}
    store.insert(conn, "logs", {"run_id": RUN, "replay_id": replay, "name": name, "value": value, **row})


def add_replay(conn: sqlite3.Connection, replay_id: str, status: str) -> None:
    store.insert(
        conn,
        "replays",
        {"replay_id": replay_id, "run_id": RUN, "started": 1.0, "status": status, "pid": None, "host": None},
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "flor.db"
    with closing(store.connect(path)) as conn:
        store.insert(conn, "runs", {"run_id": RUN, "project": "p", "started": 0.0, "status": "finished"})
    return path


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    with closing(store.connect(db)) as c:
        yield c


def test_compare_counts_matches_mismatches_and_new_names(conn):
    for name, value in [("val_loss", 0.5), ("val_acc", 0.75), ("val_ece", 0.125)]:
        log(conn, name, value)
    log(conn, "val_loss", 0.5, epoch=1, step=20)
    log(conn, "val_loss", 0.5, replay="r")  # the same value: matched
    log(conn, "val_loss", 0.75, replay="r", epoch=1, step=20)  # off by 0.25
    log(conn, "val_acc", 0.5, replay="r")  # off by 0.25 too
    log(conn, "val_ece", 0.125, replay="r", step=11)  # another step: not the recorded value
    log(conn, "val_conf", 0.9, replay="r")  # a name the recording lacks
    log(conn, "val_loss", 0.5, replay="other")  # another replay's value does not count
    report = ReplayReport(replay_id="r", run_id=RUN, train=False, reason="test")

    compare(conn, report)

    assert (report.rederived, report.matched, report.mismatched) == (3, 1, 2)
    assert report.max_difference == 0.25
    assert report.mismatched_names == ["val_acc", "val_loss"]
    assert (report.new_values, report.new_names) == (2, ["val_conf", "val_ece"])


def test_compare_matches_on_stage_level_and_batch_index_too(conn):
    log(conn, "loss", 1.0, stage="train", level="step", batch_idx=3)
    log(conn, "loss", 1.0, replay="r", stage="train", level="step", batch_idx=3)
    log(conn, "loss", 1.0, replay="r", stage="train", level="step", batch_idx=4)
    log(conn, "loss", 1.0, replay="r", stage="train", level="epoch")
    report = ReplayReport(replay_id="r", run_id=RUN, train=True, reason="test")

    compare(conn, report)

    assert (report.rederived, report.matched, report.new_values) == (1, 1, 2)


def test_fill_epochs_gathers_what_every_segment_did(conn):
    steps = [(0, "train", 0), (1, "restore", 1), (2, "restore", 1), (1, "restore", 1), (3, "train", 1)]
    for epoch, action, wanted in steps:  # epoch 1 twice: two segments may both report it
        store.insert(conn, "replay_epochs", {"replay_id": "r", "epoch": epoch, "action": action, "wanted": wanted})
    for epoch in (2, -1):
        store.insert(conn, "replay_bad_checkpoints", {"replay_id": "r", "epoch": epoch})
    store.insert(conn, "replay_epochs", {"replay_id": "other", "epoch": 9, "action": "train", "wanted": 1})
    report = ReplayReport(replay_id="r", run_id=RUN, train=False, reason="test")

    fill_epochs(conn, report)

    assert report.epochs_restored == [1, 2]
    assert report.epochs_trained == [0, 3]
    assert report.bad_checkpoints == [-1, 2]


def test_a_finished_replay_replaces_unfinished_ones_where_it_logged_again(conn):
    add_replay(conn, "failed", "failed")
    add_replay(conn, "done", "finished")
    add_replay(conn, "new", "finished")
    for replay in ("failed", "done"):
        log(conn, "val_conf", 0.1, replay=replay)
    log(conn, "val_conf", 0.1, replay="failed", epoch=1, step=20)  # repeated by the new one too
    log(conn, "val_conf", 0.1, replay="failed", epoch=2, step=30)  # an epoch the new one did not reach
    log(conn, "val_f1", 0.1, replay="failed")  # a name the new one does not log
    log(conn, "val_conf", 0.2, replay="new")
    log(conn, "val_conf", 0.2, replay="new", epoch=1, step=99)  # the same epoch at another step still repeats
    report = ReplayReport(replay_id="new", run_id=RUN, train=False, reason="test")

    replace_unfinished(conn, report)

    assert (report.replaced_values, report.replaced_replays) == (2, ["failed"])
    left = store.fetch(conn, "SELECT replay_id, name, epoch FROM logs ORDER BY replay_id, name, epoch")
    assert [(r["replay_id"], r["name"], r["epoch"]) for r in left] == [
        ("done", "val_conf", 0),  # a finished replay keeps its values
        ("failed", "val_conf", 2),
        ("failed", "val_f1", 0),
        ("new", "val_conf", 0),
        ("new", "val_conf", 1),
    ]


def test_a_replay_still_running_is_not_replaced(conn):
    store.insert(
        conn,
        "replays",
        {
            "replay_id": "live",
            "run_id": RUN,
            "started": 1.0,
            "status": "running",
            "pid": os.getpid(),  # this process: alive
            "host": socket.gethostname(),
        },
    )
    add_replay(conn, "new", "finished")
    log(conn, "val_conf", 0.1, replay="live")
    log(conn, "val_conf", 0.2, replay="new")
    report = ReplayReport(replay_id="new", run_id=RUN, train=False, reason="test")

    replace_unfinished(conn, report)

    assert report.replaced_values == 0
    assert len(store.fetch(conn, "SELECT * FROM logs WHERE replay_id = 'live'")) == 1


def test_store_report_fills_and_stores_the_report_with_the_clock_s_time(db):
    with closing(store.connect(db)) as conn:
        add_replay(conn, "failed", "failed")
        add_replay(conn, "r", "running")
        log(conn, "val_loss", 0.5)
        log(conn, "val_loss", 0.5, replay="r")
        log(conn, "val_loss", 0.4, replay="failed")
        store.insert(conn, "replay_epochs", {"replay_id": "r", "epoch": 0, "action": "restore", "wanted": 1})
    report = ReplayReport(replay_id="r", run_id=RUN, train=False, reason="test", seconds=2.0)

    store_report(db, report, primary=True, clock=lambda: 1234.5)

    [row] = rows(db, "SELECT status, ended, report FROM replays WHERE replay_id = 'r'")
    assert (row["status"], row["ended"]) == ("finished", 1234.5)
    stored = json.loads(row["report"])
    assert stored["epochs_restored"] == [0] and stored["matched"] == 1 and stored["replaced_replays"] == ["failed"]
    assert stored == json.loads(json.dumps(report.__dict__))


def test_a_failed_replay_is_stored_failed_and_replaces_nothing(db, recwarn):
    with closing(store.connect(db)) as conn:
        add_replay(conn, "older", "failed")
        add_replay(conn, "r", "running")
        log(conn, "val_loss", 0.4, replay="older")
        log(conn, "val_loss", 0.5, replay="r")
    report = ReplayReport(replay_id="r", run_id=RUN, train=False, reason="test", status="failed", error="E: boom")

    store_report(db, report, primary=True, clock=lambda: 7.0)

    [row] = rows(db, "SELECT status, ended FROM replays WHERE replay_id = 'r'")
    assert (row["status"], row["ended"]) == ("failed", 7.0)
    assert report.replaced_values == 0 and len(rows(db, "SELECT * FROM logs WHERE replay_id = 'older'")) == 1
    assert any("flor replay r of run run1 failed after" in str(w.message) for w in recwarn)


def test_another_rank_stores_no_report(db):
    with closing(store.connect(db)) as conn:
        add_replay(conn, "r", "running")
        log(conn, "val_loss", 0.5)
        log(conn, "val_loss", 0.5, replay="r")
        store.insert(conn, "replay_epochs", {"replay_id": "r", "epoch": 0, "action": "restore", "wanted": 1})
    report = ReplayReport(replay_id="r", run_id=RUN, train=False, reason="test")

    store_report(db, report, primary=False, clock=lambda: 7.0)

    assert report.epochs_restored == [0] and report.rederived == 0  # its epochs, but no comparison
    [row] = rows(db, "SELECT status, ended, report FROM replays")
    assert (row["status"], row["ended"], row["report"]) == ("running", None, None)


def test_the_report_text_says_what_a_failed_replay_did_before_it_failed():
    report = ReplayReport(
        replay_id="r",
        run_id=RUN,
        train=False,
        reason="test",
        epochs_restored=[0, 1, 2],
        rederived=4,
        matched=3,
        mismatched=1,
        max_difference=0.25,
        mismatched_names=["val_loss"],
        seconds=2.0,
        status="failed",
        error="RuntimeError: boom\nTraceback ...",
    )
    text = str(report).splitlines()
    assert text[0] == "flor replay r of run run1 failed after 2.0s (RuntimeError: boom); before that it did"
    assert text[1] == "  epochs restored: 0-2; re-trained: -"
    assert text[3].endswith("mismatched: 1 (largest difference 0.25 in val_loss)")


def test_cause_names_the_error_and_an_interrupt():
    assert cause(RuntimeError("boom")) == "RuntimeError: boom"
    assert cause(SystemExit(1)) == "interrupted: SystemExit(1), as Lightning exits on Ctrl-C"


def test_the_notes_on_checkpoints_inside_epochs_are_printed_and_stored(db):
    note = "training starts from the checkpoint inside epoch 0 after batch 5 (step 6)"
    with closing(store.connect(db)) as conn:
        add_replay(conn, "r", "running")
    report = ReplayReport(replay_id="r", run_id=RUN, train=True, reason="test", notes=[note])
    assert str(report).splitlines()[-1] == f"  {note}"
    store_report(db, report, primary=True, clock=lambda: 1.0)
    [row] = rows(db, "SELECT report FROM replays WHERE replay_id = 'r'")
    assert json.loads(row["report"])["notes"] == [note]
