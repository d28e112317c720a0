"""Reading the log store back as pandas DataFrames."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from flor_lightning import store
from flor_lightning.errors import ConfigError, StoreError
from flor_lightning.locate import locate

KEY = ["run_id", "epoch", "step"]
RUN_COLUMNS = ["run_id", "started", "status", "script", "shadow_commit"]


def open_store(db: str | Path | None = None) -> sqlite3.Connection:
    """Connect to an existing log store (default: the one of the current project)."""
    path = Path(db) if db is not None else locate().db_path
    if not path.exists():
        raise StoreError(
            f"no flor log store at {str(path)!r}. Record a run first with "
            "Trainer(callbacks=[FlorCallback()]).fit(...), or run from inside the project that recorded it."
        )
    return store.connect(path)


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
    conn = open_store(db)
    try:
        return _records(conn, list(names), _as_list(run))
    finally:
        conn.close()


def _records(conn: sqlite3.Connection, names: list[str], run_ids: list[str] | None) -> pd.DataFrame:
    clauses, params = [], []
    if names:
        clauses.append(f"name IN ({store.placeholders(names)})")
        params += names
    if run_ids:
        clauses.append(f"run_id IN ({store.placeholders(run_ids)})")
        params += run_ids
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    cur = conn.execute(
        f"SELECT run_id, replay_id, stage, level, epoch, step, batch_idx, name, value, text FROM logs {where} "
        "ORDER BY rowid",
        params,
    )
    cols = [d[0] for d in cur.description]
    df = pd.DataFrame.from_records(cur.fetchall(), columns=cols)
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    text = df["text"].notna() & (df["text"] != "nan")
    if text.any():
        df["value"] = df["value"].astype(object)
        df.loc[text, "value"] = df.loc[text, "text"]
    return df.drop(columns="text")


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
    conn = open_store(db)
    try:
        run_ids = _as_list(run)
        rec = _records(conn, list(names), run_ids)
        run_rows = store.fetch(conn, "SELECT * FROM runs ORDER BY started, run_id")
    finally:
        conn.close()
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
