"""flor.query / records / runs / export over a real sqlite store written through the store module."""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import flor_lightning as flor
from flor_lightning import ConfigError, StoreError
from flor_lightning import _store as store

flor_query = importlib.import_module("flor_lightning._query")  # flor_lightning._query is the function
RUN_A, RUN_B = "20260101-000000-aaaaaa", "20260102-000000-bbbbbb"
RUN_LEVEL = ["run_id", "started", "status", "script", "shadow_commit"]


def add_run(conn: sqlite3.Connection, run_id: str, *, started: float, hparams: dict[str, Any], **extra: Any) -> None:
    row = {
        "run_id": run_id,
        "project": "proj",
        "script": "train.py",
        "argv": [],
        "started": started,
        "status": "finished",
        "pid": None,
        "host": socket.gethostname(),
        "hparams": hparams,
        "settings": {"max_epochs": 2},
        "versions": {},
        "shadow_commit": None,
    }
    store.insert(conn, "runs", {**row, **extra})


def add_values(db: Path, rows: list[tuple[Any, ...]]) -> None:
    """Write ``(run_id, replay_id, stage, level, epoch, step, batch_idx, name, value)`` rows through the writer."""
    writer = store.LogWriter(lambda: store.connect(db), interval=60)
    for row in rows:
        writer.add(row)
    writer.close()


def training(run_id: str, scale: float, replay_id: str | None = None) -> list[tuple[Any, ...]]:
    """Two epochs of two steps each, a train loss per step and a val_loss at each epoch end."""
    out: list[tuple[Any, ...]] = []
    for epoch in range(2):
        for step in (2 * epoch, 2 * epoch + 1):
            out.append((run_id, replay_id, "train", "step", epoch, step, step % 2, "loss", scale / (step + 1)))
        out.append((run_id, replay_id, "validate", "epoch", epoch, 2 * epoch + 2, None, "val_loss", scale * epoch))
    return out


@pytest.fixture
def db(project: Path) -> Path:
    """A store of two finished runs: A (lr 0.001) started before B (lr 0.1)."""
    path = project / ".flor" / "flor.db"
    conn = store.connect(path)
    add_run(conn, RUN_B, started=200.0, hparams={"lr": 0.1, "hidden": 64})
    add_run(conn, RUN_A, started=100.0, hparams={"lr": 0.001, "hidden": 32})
    conn.close()
    add_values(path, training(RUN_A, 1.0) + training(RUN_B, 10.0))
    return path


def test_query_is_one_row_per_run_epoch_step(db: Path) -> None:
    df = flor.query()

    assert len(df) == 12
    assert not df.duplicated(["run_id", "epoch", "step"]).any()
    assert list(df.columns) == [*RUN_LEVEL, "lr", "hidden", "epoch", "step", "loss", "val_loss"]
    assert list(df["run_id"].unique()) == [RUN_A, RUN_B]  # oldest run first
    first = df[df["run_id"] == RUN_A]
    assert list(zip(first["epoch"], first["step"], strict=True)) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    assert first["loss"].tolist()[:2] == [1.0, 0.5]
    assert math.isnan(first["loss"].iloc[2])
    assert first["val_loss"].dropna().tolist() == [0.0, 1.0]
    for col in ("epoch", "step"):
        assert df[col].dtype == "int64"
    for col in ("loss", "val_loss", "lr"):
        assert df[col].dtype == "float64"
    assert (df[df["run_id"] == RUN_B]["lr"] == 0.1).all()


def test_names_filter(db: Path) -> None:
    df = flor.query("val_loss")

    assert "loss" not in df.columns
    assert len(df) == 4
    assert df["val_loss"].notna().all()


def test_run_filter(db: Path) -> None:
    assert set(flor.query(run=RUN_B)["run_id"]) == {RUN_B}
    assert set(flor.query(run=[RUN_A, RUN_B])["run_id"]) == {RUN_A, RUN_B}
    assert set(flor.records(run=RUN_A)["run_id"]) == {RUN_A}


def test_unknown_run_is_named_with_the_latest_runs(db: Path) -> None:
    with pytest.raises(flor.UnknownRunError, match=r"unknown run id 'nope'; the latest runs are \[.*flor\.runs") as e:
        flor.query(run=["nope", RUN_A])
    assert e.value.unknown == ["nope"] and RUN_A in e.value.latest
    assert isinstance(e.value, LookupError)


def test_where_over_hyperparameters_and_axes(db: Path) -> None:
    assert set(flor.query(where="lr < 0.01")["run_id"]) == {RUN_A}
    df = flor.query("loss", where="lr > 0.01 and epoch == 1")
    assert list(zip(df["run_id"], df["step"], strict=True)) == [(RUN_B, 2), (RUN_B, 3)]


@pytest.mark.parametrize("where", ["no_such_column > 1", "lr <<< 1", "lr <"])
def test_bad_where_is_a_config_error(db: Path, where: str) -> None:
    with pytest.raises(ConfigError, match="cannot evaluate where") as err:
        flor.query(where=where)
    assert "Columns:" in str(err.value)


def test_hyperparameter_named_like_a_logged_value_is_prefixed(project: Path) -> None:
    path = project / ".flor" / "flor.db"
    conn = store.connect(path)
    add_run(conn, RUN_A, started=1.0, hparams={"loss": "focal", "epoch": 9})
    conn.close()
    add_values(path, training(RUN_A, 1.0))

    df = flor.query()

    assert (df["hparam.loss"] == "focal").all()
    assert (df["hparam.epoch"] == 9).all()
    assert df["loss"].dtype == "float64"
    assert list(df["epoch"].unique()) == [0, 1]


def test_replayed_values_fill_the_recorded_rows(db: Path) -> None:
    conn = store.connect(db)
    store.insert(conn, "replays", {"replay_id": "rp1", "run_id": RUN_A, "started": 300.0, "status": "finished"})
    conn.close()
    add_values(
        db,
        [
            (RUN_A, "rp1", "validate", "epoch", 0, 2, None, "val_f1", 0.25),
            (RUN_A, "rp1", "validate", "epoch", 1, 4, None, "val_f1", 0.5),
            (RUN_A, "rp1", "train", "step", 0, 0, 0, "loss", 99.0),  # differs from the recording
        ],
    )

    df = flor.query()
    a = df[df["run_id"] == RUN_A].set_index(["epoch", "step"])
    assert len(df) == 12  # no new rows: replayed values land on the recorded axis
    assert a.loc[(0, 2), "val_f1"] == 0.25
    assert a.loc[(1, 4), "val_f1"] == 0.5
    assert a.loc[(0, 0), "loss"] == 1.0  # the recorded value wins
    assert df[df["run_id"] == RUN_B]["val_f1"].isna().all()
    assert "loss@replay" not in df.columns

    both = flor.query(replayed=True)
    a = both[both["run_id"] == RUN_A].set_index(["epoch", "step"])
    assert a.loc[(0, 0), "loss"] == 1.0
    assert a.loc[(0, 0), "loss@replay"] == 99.0
    assert math.isnan(a.loc[(0, 1), "loss@replay"])
    assert a.loc[(1, 4), "val_f1@replay"] == 0.5

    # a later replay of the same value is the one shown
    add_values(db, [(RUN_A, "rp2", "validate", "epoch", 1, 4, None, "val_f1", 0.75)])
    latest = flor.query("val_f1", replayed=True).set_index(["run_id", "epoch", "step"])
    assert latest.loc[(RUN_A, 1, 4), "val_f1@replay"] == 0.75
    assert len(flor.records("val_f1")) == 3  # records keeps every value


def test_values_of_unfinished_replays_count_only_when_asked_for(db: Path) -> None:
    """A failed, crashed or still running replay's values stay out of query and records unless unfinished=True;
    values of a replay id the store has no row for (merged from another store) are shown."""
    conn = store.connect(db)
    for replay_id, status, pid in [("done", "finished", None), ("bad", "failed", None), ("dead", "running", 1 << 22)]:
        row = {"replay_id": replay_id, "run_id": RUN_A, "started": 1.0, "status": status}
        store.insert(conn, "replays", row | {"pid": pid, "host": socket.gethostname()})
    conn.close()
    add_values(
        db,
        [
            (RUN_A, replay_id, "validate", "epoch", 1, 4, None, "val_f1", value)
            for replay_id, value in [("done", 0.5), ("bad", 50.0), ("dead", 60.0), ("merged", 0.7)]
        ],
    )
    shown = flor.query("val_f1", run=RUN_A, replayed=True).set_index(["epoch", "step"])
    assert shown.loc[(1, 4), "val_f1@replay"] == 0.7  # the latest value of a replay not known to be unfinished
    assert set(flor.records("val_f1")["replay_id"]) == {"done", "merged"}
    everything = flor.query("val_f1", run=RUN_A, replayed=True, unfinished=True).set_index(["epoch", "step"])
    assert everything.loc[(1, 4), "val_f1@replay"] == 0.7
    rec = flor.records("val_f1", unfinished=True)
    assert dict(zip(rec["replay_id"], rec["replay_status"], strict=True)) == {
        "done": "finished",
        "bad": "failed",
        "dead": "crashed",  # marked running, its process gone
        "merged": None,
    }
    assert flor.records("loss", run=RUN_A)["replay_status"].isna().all()  # recorded values


def test_logged_names_that_are_built_in_columns_get_their_own(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A value logged as step, epoch, run_id or status is ``metric.<name>``: no duplicated column, and
    where= and the run table mean the built-in ones."""
    clashing = ["step", "epoch", "run_id", "status"]
    add_values(db, [(RUN_A, None, "train", "step", 1, 3, 1, name, 100.0 + i) for i, name in enumerate(clashing)])
    add_values(db, [(RUN_A, "rp", "train", "step", 1, 3, 1, "step", 7.0)])
    df = flor.query(run=RUN_A, replayed=True)
    assert not df.columns.duplicated().any()
    assert {f"metric.{n}" for n in clashing} | {"metric.step@replay"} <= set(df.columns)
    assert df.set_index("step").loc[3, "metric.epoch"] == 101.0
    assert flor.query(run=RUN_A, where="step > 2")["step"].tolist() == [3, 4]
    assert flor.query("step", run=RUN_A).dropna(subset=["metric.step"])["metric.step"].tolist() == [100.0]

    from flor_lightning import _cli as cli

    assert cli.main(["runs", "--format", "json"]) == 0
    (run,) = [r for r in json.loads(capsys.readouterr().out) if r["run_id"] == RUN_A]
    assert not any(k.endswith(("_x", "_y")) for k in run)
    assert run["final.run_id"] == 102.0 and run["final.status"] == 103.0 and run["status"] == "finished"


def test_text_and_nan_values(project: Path) -> None:
    path = project / ".flor" / "flor.db"
    conn = store.connect(path)
    add_run(conn, RUN_A, started=1.0, hparams={})
    conn.close()
    add_values(
        path,
        [
            (RUN_A, None, "train", "step", 0, 0, 0, "note", "warming up"),
            (RUN_A, None, "train", "step", 0, 0, 0, "hist", [1.0, 2.0]),
            (RUN_A, None, "train", "step", 0, 0, 0, "x", math.nan),
            (RUN_A, None, "train", "step", 0, 1, 1, "x", math.inf),
        ],
    )

    rec = flor.records().set_index("name")
    assert rec.loc["note", "value"] == "warming up"
    assert rec.loc["hist", "value"] == "[1.0, 2.0]"
    df = flor.query()
    assert df["note"].tolist()[0] == "warming up"
    assert df["x"].dtype == "float64"
    assert math.isnan(df["x"].iloc[0])
    assert df["x"].iloc[1] == math.inf


def test_repeated_value_keeps_the_last_in_query_and_all_in_records(db: Path) -> None:
    add_values(db, [(RUN_A, None, "train", "step", 0, 0, 0, "loss", 7.0)])

    assert flor.query("loss", run=RUN_A)["loss"].iloc[0] == 7.0
    rec = flor.records("loss", run=RUN_A)
    assert rec[(rec["epoch"] == 0) & (rec["step"] == 0)]["value"].tolist() == [1.0, 7.0]


def test_query_with_no_matching_name_is_empty(db: Path) -> None:
    df = flor.query("never_logged")

    assert df.empty
    assert {"run_id", "epoch", "step"} <= set(df.columns)


def test_export_writes_parquet_that_reads_back_equal(db: Path, tmp_path: Path) -> None:
    out = flor.export(tmp_path / "runs.parquet", where="lr < 0.01")

    assert out == tmp_path / "runs.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(out), flor.query(where="lr < 0.01"))


def finished_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_shows_a_running_row_of_a_dead_process_as_crashed(project: Path) -> None:
    conn = store.connect(project / ".flor" / "flor.db")
    add_run(conn, "dead", started=1.0, hparams={}, status="running", pid=finished_pid())
    add_run(conn, "alive", started=2.0, hparams={}, status="running", pid=os.getpid())
    add_run(conn, "elsewhere", started=3.0, hparams={}, status="running", pid=finished_pid(), host="another-host")
    add_run(conn, "done", started=4.0, hparams={"lr": 0.1}, status="finished", pid=finished_pid())
    conn.close()

    runs = flor.runs().set_index("run_id")

    assert runs["status"].to_dict() == {
        "dead": "crashed",
        "alive": "running",
        "elsewhere": "running",
        "done": "finished",
    }
    assert runs.loc["done", "hparams"] == {"lr": 0.1}
    assert runs.loc["done", "settings"] == {"max_epochs": 2}
    assert isinstance(runs.loc["done", "started"], pd.Timestamp)
    # the stored row is left as it is: only the reading says crashed
    conn = store.connect(project / ".flor" / "flor.db")
    assert conn.execute("SELECT status FROM runs WHERE run_id = 'dead'").fetchone()[0] == "running"
    conn.close()


def test_no_store_is_a_store_error_that_says_what_to_do(project: Path) -> None:
    for read in (flor.query, flor.runs, flor.records):
        with pytest.raises(StoreError, match=r"no flor log store at .*flor\.db.*Record a run first"):
            read()
    assert not (project / ".flor" / "flor.db").exists()  # reading created nothing


def test_an_explicit_db_is_read_from_anywhere(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert len(flor.query(db=db)) == 12
    assert len(flor.runs(db=str(db))) == 2


def reference_pivot(rec: pd.DataFrame, replayed: bool) -> pd.DataFrame:
    """The pivot spelled out in plain pandas over records(): last written wins, recorded before replayed."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    rec = rec.assign(seq=range(len(rec)), recorded=rec["replay_id"].isna())
    for r in rec.sort_values(["recorded", "seq"], kind="stable").itertuples():  # later rows overwrite
        out.setdefault((r.run_id, r.epoch, r.step), {})[r.name] = r.value
    if replayed:
        for r in rec[~rec["recorded"]].itertuples():
            out[(r.run_id, r.epoch, r.step)][f"{r.name}@replay"] = r.value
    return pd.DataFrame([{"run_id": k[0], "epoch": k[1], "step": k[2], **v} for k, v in out.items()])


@pytest.mark.parametrize(("replayed", "rows_per_reader"), [(False, 250_000), (True, 250_000), (True, 100)])
def test_pivot_agrees_with_a_plain_reference_on_a_messy_store(
    project: Path, monkeypatch: pytest.MonkeyPatch, replayed: bool, rows_per_reader: int
) -> None:
    """Duplicates, replays of recorded and new names, text, NaN and a run the filter leaves out;
    read by one reader, or by several over ranges of rows (as a big store is)."""
    monkeypatch.setattr(flor_query, "_ROWS_PER_READER", rows_per_reader)
    rng = random.Random(7)
    path = project / ".flor" / "flor.db"
    conn = store.connect(path)
    runs = [f"2026010{i}-000000-run{i:03d}" for i in range(3)]
    for i, run_id in enumerate(runs):
        add_run(conn, run_id, started=float(10 - i), hparams={"i": i})
    conn.close()
    rows: list[tuple[Any, ...]] = []
    for _ in range(600):
        run_id, replay = rng.choice(runs), rng.choice([None, None, None, "rpA", "rpB"])
        epoch = rng.randrange(3)
        value: Any = rng.choice([rng.random(), rng.randrange(5), math.nan, "text", [1, 2]])
        rows.append(
            (run_id, replay, "train", "step", epoch, epoch * 4 + rng.randrange(4), 0, rng.choice("abcd"), value)
        )
    add_values(path, rows)

    wanted = runs[:2]
    got = flor.query(run=wanted, replayed=replayed)
    rec = flor.records(run=wanted)
    expected = reference_pivot(rec, replayed)

    assert list(got["run_id"].unique()) == [runs[1], runs[0]]  # the run started first comes first
    assert not got.duplicated(["run_id", "epoch", "step"]).any()
    got = got.set_index(["run_id", "epoch", "step"])
    expected = expected.set_index(["run_id", "epoch", "step"]).reindex(got.index)
    assert len(expected) == len(got) == len(rec.drop_duplicates(["run_id", "epoch", "step"]))
    value_columns = sorted(c for c in got.columns if c not in RUN_LEVEL and c != "i")
    assert value_columns == sorted(expected.columns)
    for col in value_columns:
        for key, a, b in zip(got.index, got[col], expected[col], strict=True):
            same = (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b
            assert same, (col, key, a, b)


def test_a_recorded_nan_stays_although_a_replay_has_a_number(db: Path) -> None:
    add_values(
        db,
        [(RUN_A, None, "train", "step", 0, 0, 0, "odd", math.nan), (RUN_A, "rp", "train", "step", 0, 0, 0, "odd", 5.0)],
    )

    assert math.isnan(flor.query("odd", run=RUN_A)["odd"].iloc[0])
    assert flor.query("odd", run=RUN_A, replayed=True)["odd@replay"].iloc[0] == 5.0


def _write_and_close_repeatedly(db: Path, stop: Any) -> None:
    """A writer that opens, writes and closes its only connection over and over: each close
    checkpoints the WAL and holds the file for a moment, as a recorder's last close does."""
    step = 0
    while not stop.is_set():
        with closing(store.connect(db)) as conn:
            row = [RUN_A, step]
            conn.execute("INSERT INTO logs VALUES (?, NULL, 'train', 'step', 9, ?, 0, 'loss', 1.0, NULL)", row)
        step += 1


def test_queries_wait_for_a_busy_store_instead_of_failing(db: Path) -> None:
    stop = multiprocessing.get_context("fork").Event()
    writer = multiprocessing.get_context("fork").Process(target=_write_and_close_repeatedly, args=(db, stop))
    writer.start()
    try:
        reads, deadline = 0, time.monotonic() + 3
        while time.monotonic() < deadline:  # each read failed ~2 times in 3 with "database is locked" before
            assert len(flor.records(db=db)) >= 12
            assert set(flor.query(db=db)["run_id"]) == {RUN_A, RUN_B}
            reads += 1
    finally:
        stop.set()
        writer.join(timeout=30)
    assert reads > 0 and writer.exitcode == 0
