"""The run session on a real sqlite file and a real checkpoint folder, without a Trainer."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import rows

from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import ConfigError
from flor_lightning._locate import Location
from flor_lightning._session import RunSession, recorded_checkpoints, reopen_run, run_exists


class Clock:
    """A wall clock the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NewRun:
    """A run row builder that counts its calls (the callback's commits the code)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, run_id: str, checkpoint_url: str | None) -> dict[str, Any]:
        self.calls.append((run_id, checkpoint_url))
        return {"run_id": run_id, "project": "proj", "checkpoint_root": checkpoint_url, "settings": {"max_epochs": 3}}


@pytest.fixture
def loc(tmp_path: Path) -> Location:
    return Location(root=tmp_path, in_git=False, db_path=tmp_path / ".flor" / "flor.db", project="proj")


def open_session(loc: Location, clock: Clock, new_run: NewRun, **given: Any) -> RunSession:
    options: dict[str, Any] = {"run_id": None, "replay_id": None, "checkpoints": None, "resume_from": None}
    return RunSession.open(loc, **{**options, **given}, new_run=new_run, flush_interval=0.05, clock=clock)


def the_runs(loc: Location) -> list[dict[str, Any]]:
    return rows(loc.db_path, "SELECT * FROM runs")


def test_a_fit_records_a_new_run_from_open_to_close(loc: Location, tmp_path: Path) -> None:
    clock, new_run = Clock(), NewRun()
    checkpoints = CheckpointStore(str(tmp_path / "ckpts"))
    session = open_session(loc, clock, new_run, checkpoints=checkpoints)

    assert new_run.calls == [(session.run_id, str(tmp_path / "ckpts"))]
    (run,) = the_runs(loc)
    assert (run["run_id"], run["status"], run["started"], run["ended"]) == (session.run_id, "running", 1000.0, None)
    assert (run["pid"], run["host"]) == (os.getpid(), socket.gethostname())
    assert session.owns_run and session.checkpoints is checkpoints and session.checkpointed == set()
    assert session.store_seconds > 0  # the run's row, written on this thread
    assert (loc.db_path.parent / ".gitignore").is_file()
    session.writer.add((session.run_id, None, "train", "step", 0, 0, 0, "loss", 0.5))

    clock.now = 1010.0
    session.close("finished")

    (run,) = the_runs(loc)
    assert (run["status"], run["ended"]) == ("finished", 1010.0)
    assert [(r["name"], r["value"]) for r in rows(loc.db_path, "SELECT * FROM logs")] == [("loss", 0.5)]


def test_an_epoch_row_leaves_out_the_checkpoint_and_counts_its_validations(loc: Location, tmp_path: Path) -> None:
    clock = Clock(100.0)
    session = open_session(loc, clock, NewRun(), checkpoints=CheckpointStore(str(tmp_path / "ckpts")))
    session.epoch_starting()
    clock.now = 102.0  # the checkpoint of the epoch before took 2 s
    session.epoch_started()
    for start, end in ((103.0, 104.0), (105.0, 107.5)):
        clock.now = start
        session.validation_started()
        clock.now = end
        session.validation_ended()
    clock.now = 110.0
    session.write_epoch(0)
    clock.now = 111.0
    session.epoch_starting()
    session.close("finished")

    (epoch,) = rows(loc.db_path, "SELECT * FROM epochs")
    assert (epoch["epoch"], epoch["started"], epoch["ended"], epoch["val_seconds"]) == (0, 102.0, 110.0, 3.5)
    assert session.epoch_seconds == 11.0  # from one epoch's start to the next, its checkpoint included


def test_epoch_seconds_is_zero_until_a_second_epoch_starts(loc: Location, tmp_path: Path) -> None:
    session = open_session(loc, Clock(), NewRun(), checkpoints=CheckpointStore(str(tmp_path / "ckpts")))
    session.epoch_starting()
    assert session.epoch_seconds == 0.0
    session.close(None)


def test_a_checkpoint_is_indexed_once_it_is_written(loc: Location, tmp_path: Path) -> None:
    clock = Clock()
    ckpts = CheckpointStore(str(tmp_path / "ckpts"))
    session = open_session(loc, clock, NewRun(), checkpoints=ckpts)
    clock.now = 1005.0
    session.save_checkpoint(ckpts.snapshot({"weight": torch.arange(4.0)}), 0, 7)
    session.close("finished")  # waits for the write

    (indexed,) = rows(loc.db_path, "SELECT * FROM checkpoints")
    assert (indexed["run_id"], indexed["epoch"], indexed["step"], indexed["created"]) == (session.run_id, 0, 7, 1005.0)
    (pack,) = json.loads(indexed["packs"])
    assert Path(indexed["path"]).stat().st_size + (tmp_path / "ckpts" / pack).stat().st_size == indexed["size"]
    loaded = CheckpointStore(str(tmp_path / "ckpts")).load(indexed["path"], indexed["sha256"])
    assert torch.equal(loaded["weight"], torch.arange(4.0))


def test_an_unwritable_checkpoint_folder_stops_the_open_before_any_run_or_code(loc: Location, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    new_run = NewRun()
    with pytest.raises(ConfigError, match="cannot write checkpoints to"):
        open_session(loc, Clock(), new_run, checkpoints=CheckpointStore(str(tmp_path / "a-file")))
    assert new_run.calls == []
    assert the_runs(loc) == []


def test_validate_after_a_fit_writes_into_that_run_and_leaves_its_row_alone(loc: Location, tmp_path: Path) -> None:
    fit = open_session(loc, Clock(), NewRun(), checkpoints=CheckpointStore(str(tmp_path / "ckpts")))
    fit.close("finished")
    new_run = NewRun()
    validate = open_session(loc, Clock(2000.0), new_run, run_id=fit.run_id)

    assert new_run.calls == [] and not validate.owns_run and validate.checkpoints is None
    validate.close(None)  # what teardown passes for a run it does not own
    (run,) = the_runs(loc)
    assert (run["status"], run["ended"]) == ("finished", 1000.0)


def test_test_without_a_fit_records_a_run_of_its_own_without_checkpoints(loc: Location) -> None:
    new_run = NewRun()
    session = open_session(loc, Clock(), new_run)
    assert new_run.calls == [(session.run_id, None)] and session.owns_run and session.checkpoints is None
    session.close("finished")
    assert [r["status"] for r in the_runs(loc)] == ["finished"]


def test_a_replay_never_changes_the_runs_status(loc: Location) -> None:
    recording = open_session(loc, Clock(), NewRun())
    recording.close("finished")
    replay = open_session(loc, Clock(3000.0), NewRun(), run_id=recording.run_id, replay_id="r.1")
    replay.close("failed")
    (run,) = the_runs(loc)
    assert (run["status"], run["ended"]) == ("finished", 1000.0)


# ---- resuming ------------------------------------------------------------------------------------


def recorded_run(loc: Location, root: str, *, epochs: int) -> str:
    """A failed run with ``epochs`` epochs of values, timings and checkpoints (and the initial one)."""
    session = open_session(loc, Clock(), NewRun(), checkpoints=CheckpointStore(root))
    with store.immediate(session.conn):
        for epoch in range(-1, epochs):
            row = {"run_id": session.run_id, "epoch": epoch, "step": epoch + 1, "path": f"{root}/{epoch}.ckpt"}
            store.insert(
                session.conn, "checkpoints", {**row, "sha256": "0", "size": 1, "write_seconds": 0, "created": 0}
            )
            if epoch >= 0:
                session.writer.add((session.run_id, None, "train", "epoch", epoch, epoch, None, "loss", float(epoch)))
                store.insert(
                    session.conn,
                    "epochs",
                    {"run_id": session.run_id, "epoch": epoch, "started": 0, "ended": 1, "val_seconds": 0},
                )
    session.writer.add((session.run_id, "r.1", "validate", "epoch", epochs - 1, 0, None, "f1", 0.9))  # a replay's
    session.close("failed")
    return session.run_id


def test_a_resumed_fit_reopens_its_run_and_drops_what_followed_the_epoch(loc: Location, tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    run_id = recorded_run(loc, root, epochs=3)
    new_run = NewRun()
    elsewhere = CheckpointStore(str(tmp_path / "other"))  # the fit's default: the recorded root wins

    session = open_session(loc, Clock(5000.0), new_run, checkpoints=elsewhere, resume_from=(run_id, 0))

    assert new_run.calls == [] and session.run_id == run_id and session.owns_run
    assert session.checkpoints is not None and session.checkpoints.url == root
    assert session.checkpointed == {-1, 0}
    (run,) = the_runs(loc)
    assert (run["status"], run["ended"], run["pid"]) == ("running", None, os.getpid())
    assert [r["epoch"] for r in rows(loc.db_path, "SELECT epoch FROM epochs")] == [0]
    logs = rows(loc.db_path, "SELECT replay_id, epoch FROM logs ORDER BY epoch")
    assert logs == [{"replay_id": None, "epoch": 0}, {"replay_id": "r.1", "epoch": 2}]  # replays' values are kept
    session.close("finished")
    assert the_runs(loc)[0]["status"] == "finished"


def test_a_checkpoint_of_a_run_this_store_does_not_hold_starts_a_new_run(loc: Location, tmp_path: Path) -> None:
    new_run = NewRun()
    session = open_session(
        loc, Clock(), new_run, checkpoints=CheckpointStore(str(tmp_path / "c")), resume_from=("elsewhere", 4)
    )
    assert new_run.calls == [(session.run_id, str(tmp_path / "c"))] and session.run_id != "elsewhere"
    assert session.checkpointed == set()
    session.close("finished")


def test_the_resume_helpers_on_a_real_store(loc: Location, tmp_path: Path) -> None:
    run_id = recorded_run(loc, str(tmp_path / "ckpts"), epochs=2)
    conn = store.connect(loc.db_path)
    try:
        assert run_exists(conn, run_id) and not run_exists(conn, "nope")
        assert recorded_checkpoints(conn, run_id) == {-1, 0, 1}
        reopen_run(conn, run_id, -1)
        assert recorded_checkpoints(conn, run_id) == {-1}
        assert conn.execute("SELECT count(*) FROM logs WHERE replay_id IS NULL").fetchone()[0] == 0
    finally:
        conn.close()
