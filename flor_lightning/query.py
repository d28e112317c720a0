"""Reading the log store back as pandas DataFrames."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import adbc_driver_sqlite.dbapi as adbc_sqlite
import pandas as pd

from flor_lightning import store
from flor_lightning.errors import ConfigError, StoreError
from flor_lightning.locate import locate

KEY = ["run_id", "epoch", "step"]
RUN_COLUMNS = ["run_id", "started", "status", "script", "shadow_commit"]


def store_path(db: str | Path | None = None) -> Path:
    """The path of an existing, valid log store (default: the one of the current project)."""
    path = Path(db) if db is not None else locate().db_path
    if not path.exists():
        raise StoreError(
            f"no flor log store at {str(path)!r}. Record a run first with "
            "Trainer(callbacks=[FlorCallback()]).fit(...), or run from inside the project that recorded it."
        )
    store.connect(path).close()  # checks it is flor's and brings its schema up to date
    return path


def open_store(db: str | Path | None = None) -> sqlite3.Connection:
    """Connect to an existing log store (default: the one of the current project)."""
    return store.connect(store_path(db))


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value is not None else None)


def runs(*, db: str | Path | None = None) -> pd.DataFrame:
    """One row per recorded run, oldest first.

    A run whose process is gone while it was still marked ``running`` is shown as
    ``crashed``. Columns: run_id, project, script, argv, started, ended, status, shadow_commit,
    head_commit, branch, checkpoint_root, hparams (dict), settings (dict), versions (dict).
    """
    conn = open_store(db)
    try:
        rows = store.fetch(conn, "SELECT * FROM runs ORDER BY started, run_id")
    finally:
        conn.close()
    return _runs_frame(rows)


def _runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    host = socket.gethostname()
    for row in rows:
        if row["status"] == "running" and not store.pid_alive(row["pid"], row["host"], host):
            row["status"] = "crashed"
        for col in ("argv", "hparams", "settings", "versions"):
            row[col] = json.loads(row[col]) if row[col] else {}
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["run_id", "started", "status"])
    for col in ("started", "ended"):
        if col in df:
            df[col] = pd.to_datetime(df[col], unit="s")
    return df


def records(
    *names: str,
    run: str | Sequence[str] | None = None,
    db: str | Path | None = None,
) -> pd.DataFrame:
    """Every stored value in long form (one row per value), recorded and replayed.

    Columns: run_id, replay_id, stage, level, epoch, step, batch_idx, name, value.
    """
    path = store_path(db)
    return _records(path, list(names), _as_list(run))


def _records(db_path: Path, names: list[str], run_ids: list[str] | None, *, detail: bool = True) -> pd.DataFrame:
    """The ``logs`` rows, read through ADBC straight into Arrow columns.

    One Python object per value (sqlite3's cursor) made a million-value store take seconds to
    read; Arrow columns take a fraction of that. ADBC infers a column's type from its first rows,
    so every column is made non-NULL in SQL and its NULLs restored here.
    """
    clauses, params = [], []
    if names:
        clauses.append(f"name IN ({store.placeholders(names)})")
        params += names
    if run_ids:
        clauses.append(f"run_id IN ({store.placeholders(run_ids)})")
        params += run_ids
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    extra = "stage, level, ifnull(batch_idx, -1) AS batch_idx, " if detail else ""
    sql = (
        f"SELECT rowid AS seq, run_id, ifnull(replay_id, '') AS replay_id, {extra}epoch, step, name, "
        f"ifnull(value, 0.0) AS value, value IS NULL AS no_value, ifnull(text, '') AS text FROM logs {where}"
    )
    with adbc_sqlite.connect(f"file:{db_path}?mode=ro") as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        df = cur.fetch_df()
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in _EMPTY.items() if c in df.columns})
    if not df["seq"].is_monotonic_increasing:  # an index scan: restore the order values were written in
        df = df.sort_values("seq", kind="stable")
    df = df.drop(columns="seq").reset_index(drop=True)
    df["replay_id"] = df["replay_id"].replace("", None).astype(object)
    if detail:
        df["batch_idx"] = df["batch_idx"].where(df["batch_idx"] >= 0).astype("float64")
    value = df["value"].astype("float64").where(df["no_value"] == 0)
    text = (df["text"] != "") & (df["text"] != "nan")
    if text.any():
        value = value.astype(object)
        value[text] = df.loc[text, "text"]
    df["value"] = value
    return df.drop(columns=["no_value", "text"])


_EMPTY = {
    "seq": "int64",
    "run_id": object,
    "replay_id": object,
    "stage": object,
    "level": object,
    "epoch": "int64",
    "step": "int64",
    "batch_idx": "int64",
    "name": object,
    "value": "float64",
    "no_value": "int64",
    "text": object,
}


def query(
    *names: str,
    run: str | Sequence[str] | None = None,
    where: str | None = None,
    replayed: bool = False,
    db: str | Path | None = None,
) -> pd.DataFrame:
    """Every logged value as a pivot: one row per (run, epoch, step), one column per name.

    Run-level columns (run_id, started, status, script, shadow_commit and each hyperparameter)
    come first. A value logged several times for the same (run, epoch, step) keeps its last
    occurrence; :func:`records` keeps them all. Where a name was recorded and also replayed,
    the recorded value stays in the column; values only replayed fill it.

    Args:
        names: the logged names wanted (default: all).
        run: one run id or several (default: all runs).
        where: a pandas expression over the result's columns, e.g. ``"lr < 0.01 and epoch >= 5"``
            (evaluated by :meth:`pandas.DataFrame.query`, never turned into SQL).
        replayed: also add a ``<name>@replay`` column holding the latest replayed values.
        db: the log store (default: ``.flor/flor.db`` of this project).

    Example:
        >>> import flor_lightning as flor
        >>> flor.query("val_loss", where="epoch >= 2")  # doctest: +SKIP
    """
    path = store_path(db)
    run_ids = _as_list(run)
    rec = _records(path, list(names), run_ids, detail=False)
    with closing(store.connect(path)) as conn:
        run_rows = store.fetch(conn, "SELECT * FROM runs ORDER BY started, run_id")
    runs_df = _runs_frame(run_rows)
    if run_ids:
        unknown = sorted(set(run_ids) - set(runs_df["run_id"]))
        if unknown:
            raise ConfigError(f"unknown run id(s) {unknown}; flor.runs() lists the recorded ones")
        runs_df = runs_df[runs_df["run_id"].isin(run_ids)]
    table = _pivot(rec, replayed=replayed)
    info = _run_info(runs_df, set(table.columns))
    out = info.merge(table, on="run_id", how="inner") if len(table) else info.iloc[0:0].assign(epoch=[], step=[])
    out = out.sort_values(["started", "run_id", "epoch", "step"], kind="stable").reset_index(drop=True)
    if where:
        try:
            out = out.query(where).reset_index(drop=True)
        except Exception as err:
            raise ConfigError(f"cannot evaluate where={where!r}: {err}. Columns: {list(out.columns)}") from err
    return out


def _pivot(rec: pd.DataFrame, *, replayed: bool) -> pd.DataFrame:
    """Long records -> one row per (run, epoch, step); recorded values win over replayed ones."""
    is_replay = rec["replay_id"].notna()
    recorded = _wide(rec[~is_replay])
    latest = _wide(rec[is_replay])
    table = recorded.combine_first(latest) if len(latest) else recorded
    if replayed and len(latest):
        table = table.join(latest.add_suffix("@replay"), how="outer")
    table.columns.name = None
    return table.reset_index()


def _wide(rec: pd.DataFrame) -> pd.DataFrame:
    if rec.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], [], []], names=KEY))
    last = rec.drop_duplicates([*KEY, "name"], keep="last")
    wide = last.set_index([*KEY, "name"])["value"].unstack("name")
    for col in wide.columns:
        if wide[col].dtype == object:
            converted = pd.to_numeric(wide[col], errors="coerce")
            if converted.notna().sum() == wide[col].notna().sum():
                wide[col] = converted
    return wide


def _run_info(runs_df: pd.DataFrame, taken: set[str]) -> pd.DataFrame:
    info = runs_df[RUN_COLUMNS].copy()
    hparams = pd.json_normalize(runs_df["hparams"].tolist()) if len(runs_df) else pd.DataFrame()
    hparams.index = info.index
    for col in hparams.columns:
        name = col if col not in taken and col not in info.columns else f"hparam.{col}"
        info[name] = hparams[col]
    return info


def export(path: str | Path, *names: str, **filters: Any) -> Path:
    """Write :func:`query`'s table to a parquet file (through pyarrow) and return its path."""
    df = query(*names, **filters)
    path = Path(path)
    df.to_parquet(path, engine="pyarrow", index=False)
    return path
