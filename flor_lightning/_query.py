"""Reading the log store back as pandas DataFrames."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import adbc_driver_sqlite.dbapi as adbc_sqlite
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._errors import ConfigError, StoreError
from flor_lightning._locate import locate

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
    store.connect(path, readonly=True).close()  # checks it is flor's and brings its schema up to date
    return path


def open_store(db: str | Path | None = None, *, readonly: bool = False) -> sqlite3.Connection:
    """Connect to an existing log store (default: the one of the current project); ``readonly`` to only
    read it (a read-only file or folder is fine then)."""
    return store.connect(store_path(db), readonly=readonly)


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    return [value] if isinstance(value, str) else (list(value) if value is not None else None)


def runs(*, db: str | Path | None = None) -> pd.DataFrame:
    """One row per recorded run, oldest first.

    A run whose process is gone while it was still marked ``running`` is shown as
    ``crashed``. Columns: run_id, project, script, argv, started, ended, status, shadow_commit,
    head_commit, branch, checkpoint_root, hparams (dict), settings (dict), versions (dict), left_out (dict:
    what the code snapshot left out, each with the reason).
    """
    conn = open_store(db, readonly=True)
    try:
        rows = store.fetch(conn, "SELECT * FROM runs ORDER BY started, run_id")
    finally:
        conn.close()
    return _runs_frame(rows)


def _runs_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    host = socket.gethostname()
    for row in rows:
        row["status"] = _runs.status(row, host)
        for col in ("argv", "hparams", "settings", "versions", "left_out"):
            row[col] = json.loads(row[col]) if row[col] else {}
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["run_id", "started", "status"])
    for col in ("started", "ended"):
        if col in df:
            df[col] = pd.to_datetime(df[col], unit="s")
    return df


def records(
    *names: str,
    run: str | Sequence[str] | None = None,
    unfinished: bool = False,
    db: str | Path | None = None,
) -> pd.DataFrame:
    """Every stored value in long form (one row per value), recorded and replayed.

    Columns: run_id, replay_id, replay_status, stage, level, epoch, step, batch_idx, name, value.
    ``replay_status`` is None for a recorded value, else its replay's ``finished``, ``failed``,
    ``running`` or ``crashed`` (a replay id the store has no row for, as values merged in from
    another store carry: None too).

    Args:
        names: the logged names wanted (default: all).
        run: one run id or several (default: all runs).
        unfinished: also the values of replays that did not finish (failed, crashed, still
            running); by default only recorded values and those of finished replays.
        db: the log store (default: ``.flor/flor.db`` of this project).
    """
    path = store_path(db)
    with closing(store.connect(path, readonly=True)) as conn:
        statuses = _runs.replay_statuses(conn)
    df = _records(path, list(names), _as_list(run), unfinished=unfinished)
    status = [None if r is None else statuses.get(r) for r in df["replay_id"]]
    df.insert(2, "replay_status", pd.Series(status, index=df.index, dtype=object))
    return df


# Values of a replay the store knows did not finish (failed, crashed, running) are left out unless asked for.
_FINISHED_ONLY = "(replay_id IS NULL OR replay_id NOT IN (SELECT replay_id FROM replays WHERE status != 'finished'))"


def _filters(names: list[str], run_ids: list[str] | None, *, unfinished: bool) -> tuple[list[str], list[str]]:
    """SQL conditions on ``logs`` (to be AND-ed) and their parameters."""
    clauses, params = ([], []) if unfinished else ([_FINISHED_ONLY], [])
    if names:
        clauses.append(f"name IN ({store.placeholders(names)})")
        params += names
    if run_ids:
        clauses.append(f"run_id IN ({store.placeholders(run_ids)})")
        params += run_ids
    return clauses, params


@contextmanager
def _arrow_cursor(uri: str) -> Iterator[Any]:
    """An ADBC cursor on a read-only connection (``uri`` from :func:`store.read_uri`) that waits (up to
    30 s) while the store is busy.

    A recorder that closes its last connection checkpoints the WAL and holds the file for a
    moment; without a busy timeout (ADBC sets none) a query then failed with "database is locked".
    A damaged store's error is a :class:`StoreError` naming the file.
    """
    try:
        with adbc_sqlite.connect(uri) as conn, conn.cursor() as cur:
            cur.execute("PRAGMA busy_timeout = 30000")
            yield cur
    except adbc_sqlite.Error as err:
        raise store.store_error(unquote(urlsplit(uri).path), err) from err


def _read_arrow(uri: str, sql: str, params: list[str]) -> pa.Table:
    """A read-only query's result as Arrow columns, through ADBC (no Python object per value)."""
    with _arrow_cursor(uri) as cur:
        cur.execute(sql, params)
        return cur.fetch_arrow_table()


def _records(db_path: Path, names: list[str], run_ids: list[str] | None, *, unfinished: bool) -> pd.DataFrame:
    """The ``logs`` rows, read through ADBC straight into Arrow columns.

    One Python object per value (sqlite3's cursor) made a million-value store take seconds to
    read; Arrow columns take a fraction of that. ADBC infers a column's type from its first rows,
    so every column is made non-NULL in SQL and its NULLs restored here.
    """
    clauses, params = _filters(names, run_ids, unfinished=unfinished)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = (
        "SELECT rowid AS seq, run_id, ifnull(replay_id, '') AS replay_id, stage, level, "
        "ifnull(batch_idx, -1) AS batch_idx, epoch, step, name, "
        f"ifnull(value, 0.0) AS value, value IS NULL AS no_value, ifnull(text, '') AS text FROM logs {where}"
    )
    df = _read_arrow(store.read_uri(db_path), sql, params).to_pandas()
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=t) for c, t in _EMPTY.items() if c in df.columns})
    if not df["seq"].is_monotonic_increasing:  # an index scan: restore the order values were written in
        df = df.sort_values("seq", kind="stable")
    df = df.drop(columns="seq").reset_index(drop=True)
    df["replay_id"] = df["replay_id"].replace("", None).astype(object)
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
    unfinished: bool = False,
    db: str | Path | None = None,
) -> pd.DataFrame:
    """Every logged value as a pivot: one row per (run, epoch, step), one column per name.

    Run-level columns (run_id, started, status, script, shadow_commit and each hyperparameter)
    come first. A value logged several times for the same (run, epoch, step) keeps its last
    occurrence; :func:`records` keeps them all. Where a name was recorded and also replayed,
    the recorded value stays in the column (a recorded NaN too); values only replayed fill it.

    Args:
        names: the logged names wanted (default: all).
        run: one run id or several (default: all runs).
        where: a pandas expression over the result's columns, e.g. ``"lr < 0.01 and epoch >= 5"``
            (evaluated by :meth:`pandas.DataFrame.query`, never turned into SQL).
        replayed: also add a ``<name>@replay`` column holding the latest replayed values.
        unfinished: also use the values of replays that did not finish (failed, crashed, still
            running); by default a replay's values count once it finished, so an interrupted
            replay never mixes into a column (:func:`records` has each value's replay status).
        db: the log store (default: ``.flor/flor.db`` of this project).

    Example:
        >>> import flor_lightning as flor
        >>> flor.query("val_loss", where="epoch >= 2")  # doctest: +SKIP
    """
    path = store_path(db)
    run_ids = _as_list(run)
    with closing(store.connect(path, readonly=True)) as conn:
        run_rows = store.fetch(conn, "SELECT * FROM runs ORDER BY started, run_id")
        _runs.check_known(conn, run_ids or ())
    runs_df = _runs_frame(run_rows)
    if run_ids:
        runs_df = runs_df[runs_df["run_id"].isin(run_ids)].reset_index(drop=True)
    cells = _cells(path, list(names), run_ids, list(runs_df["run_id"]), unfinished=unfinished)
    axes, table = _pivot(cells, replayed=replayed)
    table = table.rename(columns=_metric_label)
    info = run_info(runs_df, taken={*KEY, *table.columns})
    rows = info.take(axes[0]).reset_index(drop=True)
    out = pd.concat([rows, pd.DataFrame({"epoch": axes[1], "step": axes[2]}), table], axis=1)
    return filter_rows(out, where, label="where=") if where else out


def _metric_label(column: str) -> str:
    """A logged name's column: ``metric.<name>`` where the name is a built-in column (step, epoch, run_id, ...)."""
    name = column.removesuffix("@replay")
    return f"metric.{column}" if name in {*KEY, *RUN_COLUMNS} else column


def filter_rows(df: pd.DataFrame, where: str, *, label: str) -> pd.DataFrame:
    """The rows of ``df`` where the pandas expression ``where`` holds (``label`` names the option in errors).

    Raises:
        ConfigError: it cannot be evaluated, or it is no condition (``"lr"`` gives numbers, not true/false).
    """
    columns = f"Columns: {', '.join(map(str, df.columns))}"
    try:
        mask = df.eval(where)
    except Exception as err:
        reason = " ".join(str(err).split())[:300]
        raise ConfigError(f"cannot evaluate {label}{where!r}: {reason}. {columns}") from err
    if not (isinstance(mask, pd.Series) and pd.api.types.is_bool_dtype(mask)):
        raise ConfigError(
            f"{label}{where!r} is no condition: it gives {'numbers' if isinstance(mask, pd.Series) else 'one value'} "
            f"instead of true or false per row; compare, e.g. 'lr < 0.01' or 'epoch >= 5'. {columns}"
        )
    return df[mask].reset_index(drop=True)


def logged_names(db: str | Path | None = None) -> list[str]:
    """Every name the store holds values of, sorted."""
    with closing(store.connect(store_path(db), readonly=True)) as conn:
        return [r["name"] for r in store.fetch(conn, "SELECT DISTINCT name FROM logs ORDER BY name")]


# a value's flags: 4 when replayed; plus 0 when a number, 1 when NaN (stored as text), 2 when text
_FLAGS = "(replay_id IS NOT NULL) * 4 + CASE WHEN value IS NOT NULL THEN 0 WHEN text = 'nan' THEN 1 ELSE 2 END"


@dataclass(frozen=True)
class _Cells:
    """Every stored value the pivot needs, one array entry per value, in the order they were written."""

    run: np.ndarray  # position of the run in the wanted runs' order (-1: not wanted)
    epoch: np.ndarray
    step: np.ndarray
    name: np.ndarray  # position in names
    names: list[str]  # sorted
    value: np.ndarray  # float64, NaN where the value is NaN or text
    replayed: np.ndarray  # bool
    text: np.ndarray | None  # object array of text values (None elsewhere); None when no value is text


_ROWS_PER_READER = 250_000  # a store smaller than this is read by one reader


def _cells(
    db_path: Path, names: list[str], run_ids: list[str] | None, run_order: list[str], *, unfinished: bool
) -> _Cells:
    """Read what the pivot needs: six columns through ADBC, then integer codes computed in Arrow.

    A big store is read by one reader per CPU (up to 4), each over its own range of rows in its
    own read-only connection; ADBC fills Arrow columns without holding the GIL, so they overlap.
    """
    clauses, params = _filters(names, run_ids, unfinished=unfinished)
    uri = store.read_uri(db_path)
    readers, first, last = 1, 0, 0
    if not run_ids:  # with a run filter the run index finds the rows: one reader
        with closing(store.connect(db_path, readonly=True)) as conn:
            # two queries: sqlite finds a lone min() or max() of rowid at once, both together by a scan
            first = store.fetch(conn, "SELECT min(rowid) AS n FROM logs")[0]["n"] or 0
            last = store.fetch(conn, "SELECT max(rowid) AS n FROM logs")[0]["n"] or 0
        readers = max(1, min(os.cpu_count() or 1, 4, (last - first + 1) // _ROWS_PER_READER))
    bounds = np.linspace(first, last + 1, readers + 1).astype(np.int64)
    spans: list[tuple[int, int] | None] = [(int(lo), int(hi) - 1) for lo, hi in itertools.pairwise(bounds)]
    if readers == 1:
        spans = [None]
    with ThreadPoolExecutor(readers) as pool:
        parts = [p for p in pool.map(lambda span: _read_span(uri, clauses, params, span), spans) if p[0].num_rows]
    if not parts:
        none = np.zeros(0, dtype=np.int64)
        return _Cells(none, none, none, none, [], np.zeros(0), np.zeros(0, dtype=bool), None)
    table = pa.concat_tables([t for t, _ in parts])
    text = None if all(t is None for _, t in parts) else np.concatenate([_texts(t, len(p)) for p, t in parts])
    flags = np.asarray(table["flags"])
    all_names = sorted(pc.unique(table["name"]).to_pylist())
    return _Cells(
        run=_codes(table, "run_id", run_order),
        epoch=np.asarray(table["epoch"], dtype=np.int64),
        step=np.asarray(table["step"], dtype=np.int64),
        name=_codes(table, "name", all_names),
        names=all_names,
        value=np.where(flags % 4 == 0, np.asarray(table["value"], dtype=np.float64), np.nan),
        replayed=flags >= 4,
        text=text,
    )


def _texts(text: np.ndarray | None, n: int) -> np.ndarray:
    return text if text is not None else np.full(n, None, dtype=object)


def _read_span(
    uri: str, clauses: list[str], params: list[str], span: tuple[int, int] | None
) -> tuple[pa.Table, np.ndarray | None]:
    """The values with rowid in ``span`` (inclusive; None: all), in write order, and their text (None
    when none is text).

    Text is rare, so it is read by a second query, in the same read transaction, only when there
    is some; both queries list values in write order, so the n-th text is the n-th text value.
    """
    conditions = [*clauses, "rowid BETWEEN ? AND ?"] if span else clauses
    args = [*params, *span] if span else params
    sql = f"SELECT run_id, epoch, step, name, ifnull(value, 0.0) AS value, {_FLAGS} AS flags FROM logs"
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    with _arrow_cursor(uri) as cur:
        cur.execute(f"{sql} {where} ORDER BY rowid", args)
        table = cur.fetch_arrow_table()
        is_text = np.asarray(table["flags"]) % 4 == 2 if table.num_rows else np.zeros(0, dtype=bool)
        if not is_text.any():
            return table, None
        text_where = " AND ".join([*conditions, "value IS NULL", "ifnull(text, '') != 'nan'"])
        cur.execute(f"SELECT text FROM logs WHERE {text_where} ORDER BY rowid", args)
        texts = cur.fetch_arrow_table()["text"].to_numpy(zero_copy_only=False)
    if len(texts) != is_text.sum():
        raise StoreError("the log store changed while it was read; query again")
    text = np.full(len(is_text), None, dtype=object)
    text[is_text] = texts
    return table, text


def _codes(table: pa.Table, column: str, labels: list[str]) -> np.ndarray:
    """Each value's position in ``labels`` (-1 where absent), computed in Arrow: no Python object per value."""
    at = pc.index_in(table[column], value_set=pa.array(labels, pa.string()))
    return np.asarray(pc.fill_null(at, -1), dtype=np.int64)


def _pivot(cells: _Cells, *, replayed: bool) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], pd.DataFrame]:
    """Long cells -> one row per (run, epoch, step), one column per name; recorded values win over
    replayed ones and, among equals, the last written wins.

    Works on integer codes: rows are ordered by (run position, epoch, step), a value's cell is
    ``row x width + name``, and one stable sort finds each cell's winner.

    Returns:
        (run position, epoch, step) of each row, and a frame of the columns by name (sorted,
        then the ``@replay`` ones), float64 unless they hold text.
    """
    keep = np.flatnonzero(cells.run >= 0)  # values of runs not asked for are dropped
    run, epoch, step, name = cells.run[keep], cells.epoch[keep], cells.step[keep], cells.name[keep]
    is_replay = cells.replayed[keep]

    rows = np.lexsort((step, epoch, run))
    new_row = np.ones(len(rows), dtype=bool)
    new_row[1:] = (np.diff(run[rows]) != 0) | (np.diff(epoch[rows]) != 0) | (np.diff(step[rows]) != 0)
    row = np.empty(len(rows), dtype=np.int64)
    row[rows] = np.cumsum(new_row) - 1
    first = rows[new_row]
    axes = (run[first], epoch[first], step[first])

    n = len(cells.names)
    width = 2 * n if replayed else n
    cell = row * width + name
    rank = (~is_replay).astype(np.int8)  # a recorded value outranks a replayed one in the same cell
    index = keep
    if replayed:  # replayed values also go to their own "@replay" columns
        extra = np.flatnonzero(is_replay)
        cell = np.concatenate([cell, row[extra] * width + n + name[extra]])
        rank = np.concatenate([rank, np.zeros(len(extra), dtype=np.int8)])
        index = np.concatenate([index, keep[extra]])
    by_cell = np.lexsort((rank, cell))  # stable: within a cell and rank, write order
    last = np.ones(len(by_cell), dtype=bool)
    last[:-1] = np.diff(cell[by_cell]) != 0
    win_cell, win = cell[by_cell[last]], index[by_cell[last]]
    win_row, win_col = win_cell // width, win_cell % width
    # one column after the other, as pandas keeps a block of float columns: no copy into the frame
    grid = np.full((width, len(first)), np.nan)
    grid[win_col, win_row] = cells.value[win]
    filled = np.zeros(width, dtype=bool)
    filled[win_col] = True
    labels = cells.names + [f"{x}@replay" for x in cells.names] if replayed else cells.names
    if not filled.all():  # @replay columns of names never replayed
        grid, labels = grid[filled], [label for label, f in zip(labels, filled, strict=True) if f]
        win_col = np.cumsum(filled)[win_col] - 1
    table = pd.DataFrame(grid.T, columns=labels, copy=False)
    if cells.text is not None:  # overlay the text winners on their columns
        texts = cells.text[win]
        has_text = texts != None  # noqa: E711  # elementwise over the object array
        for j in np.unique(win_col[has_text]):
            chosen = has_text & (win_col == j)
            table[labels[j]] = _with_text(grid[j], win_row[chosen], texts[chosen])
    return axes, table


def _with_text(numbers: np.ndarray, rows: np.ndarray, texts: np.ndarray) -> Any:
    """A column holding text values: object dtype, unless all its values read as numbers."""
    out = numbers.astype(object)
    out[rows] = texts
    series = pd.Series(out, dtype=object)
    converted = pd.to_numeric(series, errors="coerce")
    return converted if converted.notna().sum() == series.notna().sum() else series


def run_info(runs_df: pd.DataFrame, columns: Sequence[str] = RUN_COLUMNS, taken: Iterable[str] = ()) -> pd.DataFrame:
    """``columns`` of :func:`runs`' table and one column per hyperparameter, ``hparam.<name>``
    where the name is ``taken`` or one of ``columns``."""
    info = runs_df[[c for c in columns if c in runs_df.columns]].copy()
    taken = set(taken)
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
