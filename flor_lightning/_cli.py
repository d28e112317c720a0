"""The ``flor`` command line: runs, query, show, diff, replay, merge, export, gc, push and plot.

Every command takes ``--db PATH`` (default: ``.flor/flor.db`` of the project around the working
directory, or ``FLOR_DB``). Tabular output is a terminal table by default; ``--format csv|json``
writes machine-readable text (to ``--out`` if given), ``--format parquet`` needs ``--out``.

Exit codes: 0 ok; 1 the command ran but found a problem (unknown run, no store, a replay
skipped or failed, a corrupt checkpoint); 2 a usage error (bad option, bad ``--where``).
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import closing
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flor_lightning import _housekeeping as housekeeping
from flor_lightning import _nodes as nodes
from flor_lightning import _planner as planner
from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning import _trackers as trackers
from flor_lightning._errors import CommandProblem, ConfigError, FlorError, GitError
from flor_lightning._locate import locate
from flor_lightning._query import filter_rows, logged_names, open_store, query, records, runs, store_path
from flor_lightning._table import text_table

FORMATS = ("table", "csv", "json", "parquet")
_SHOWN_HPARAMS = 4
_SHOWN_METRICS = 4


# ---- output ------------------------------------------------------------------------------------


def emit(df: pd.DataFrame, fmt: str, out: str | None) -> None:
    """Write ``df`` as a table, csv, json (records) or parquet, to ``out`` or stdout."""
    if fmt == "parquet":
        if not out:
            raise ConfigError("--format parquet writes a file: add --out PATH")
        df.to_parquet(out, engine="pyarrow", index=False)
        return
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = json.dumps(_plain_records(df), indent=1, default=str, allow_nan=False) + "\n"
    else:
        text = _table(df)
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


def _plain_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of Python values: full float precision (pandas' to_json keeps 15 digits), None for NaN."""
    plain = df.copy()
    for col in plain.columns:
        if pd.api.types.is_datetime64_any_dtype(plain[col]):
            plain[col] = plain[col].map(lambda t: t.isoformat() if pd.notna(t) else None)
    plain = plain.astype(object).where(plain.notna(), None)
    return [{str(k): _py(v) for k, v in row.items()} for row in plain.to_dict("records")]


def _py(v: Any) -> Any:
    """A plain Python value; an infinite float as the string ``"inf"`` or ``"-inf"`` (JSON has no infinity)."""
    v = v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _finite(v: Any) -> Any:
    """``v`` with every float JSON cannot hold (an ``inf`` hyperparameter, a NaN) as :func:`_py` writes it."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else _py(v)


def _table(df: pd.DataFrame) -> str:
    """An aligned text table: text left-aligned, numbers right-aligned, missing values as ``-``."""
    if df.empty:
        return "(no rows)\n"
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    return "\n".join(text_table([str(c) for c in df.columns], cells, right=numeric)) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NaT:
        return "-"
    if isinstance(v, pd.Timestamp):
        return str(v.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _records_frame(items: Sequence[Any]) -> pd.DataFrame:
    return pd.DataFrame([asdict(i) for i in items if is_dataclass(i) and not isinstance(i, type)])


def _human(size: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def _check_runs(db: str | None, run_ids: Sequence[str] | None) -> None:
    if not run_ids:
        return
    with closing(open_store(db, readonly=True)) as conn:
        _runs.check_known(conn, run_ids)


# ---- commands ----------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    """One row per run: run, started, status, script, commit, key hparams, final metrics."""
    table = runs(db=args.db)
    if table.empty:
        emit(pd.DataFrame(columns=["run_id", "started", "status", "script", "commit"]), args.format, args.out)
        return 0
    base = table[["run_id", "started", "status", "script"]].assign(commit=table["shadow_commit"].str[:8])
    hparams = pd.json_normalize(table["hparams"].tolist()).set_axis(table.index)
    hparams = hparams.rename(columns={c: f"hparam.{c}" for c in hparams.columns if c in base.columns})
    finals = _final_metrics(args.db)
    taken = {*hparams.columns, *base.columns}
    finals = finals.rename(columns={c: f"final.{c}" for c in finals.columns if c in taken})
    wide = pd.concat([base, hparams], axis=1).merge(finals, left_on="run_id", right_index=True, how="left")
    with closing(open_store(args.db, readonly=True)) as conn:
        written = dict(conn.execute("SELECT run_id, SUM(size) FROM checkpoints GROUP BY run_id").fetchall())
        projects = housekeeping.project_disk_use(conn)
    wide["checkpoint_bytes"] = [int(written.get(r) or 0) for r in wide["run_id"]]  # what each run added
    if args.where:
        wide = _where(wide, args.where)
    if args.format != "table":
        emit(wide, args.format, args.out)
        return 0
    shown = wide[["run_id", "started", "status", "script", "commit"]].copy()
    # the hparams that tell the runs apart come first; the rest of the `_SHOWN_HPARAMS` in their order
    varying = sorted(hparams.columns, key=lambda c: wide[c].astype(str).nunique() <= 1)
    shown["hparams"] = _pairs(wide, varying[:_SHOWN_HPARAMS])
    metric_cols = sorted(finals.columns, key=lambda c: (not c.startswith(("val", "final.val")), c))
    shown["final metrics"] = _pairs(wide, metric_cols[:_SHOWN_METRICS])
    shown["checkpoints"] = [_human(b) for b in wide["checkpoint_bytes"]]
    emit(shown, "table", args.out)
    if not args.out:
        for project, size in sorted(projects.items()):
            sys.stdout.write(
                f"project {project}: {_human(size)} of checkpoints on disk (blobs shared by runs counted once)\n"
            )
    return 0


def _final_metrics(db: str | None) -> pd.DataFrame:
    """Per run (index) and recorded name (columns): the value logged last in the run's last epoch."""
    rec = records(db=db)
    rec = rec[rec["replay_id"].isna()]
    if rec.empty:
        return pd.DataFrame(index=pd.Index([], name="run_id"))
    last_epoch = rec.groupby("run_id")["epoch"].transform("max")
    final = rec[rec["epoch"] == last_epoch].drop_duplicates(["run_id", "name"], keep="last")
    table = final.pivot(index="run_id", columns="name", values="value")
    table.columns.name = None
    return table


def _pairs(df: pd.DataFrame, cols: list[str]) -> list[str]:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return [" ".join(f"{c}={fmt(row[c])}" for c in cols if pd.notna(row[c])) for _, row in df.iterrows()]


def _where(df: pd.DataFrame, expr: str) -> pd.DataFrame:
    return filter_rows(df, expr, label="--where ")


def cmd_query(args: argparse.Namespace) -> int:
    """flor.query() as a table: one row per (run, epoch, step), one column per name."""
    _check_runs(args.db, args.run)
    df = query(
        *args.names, run=args.run, where=args.where, replayed=args.replayed, unfinished=args.unfinished, db=args.db
    )
    absent = [n for n in args.names if n not in df.columns and f"metric.{n}" not in df.columns]
    if absent:
        known = logged_names(args.db)
        shown = ", ".join(known[:30]) + (f" ... ({len(known)} in all)" if len(known) > 30 else "")
        where = f" in run(s) {', '.join(args.run)}" if args.run else ""
        raise CommandProblem(
            f"no values logged under {', '.join(map(repr, absent))}{where}; the store has: {shown or '-'}"
        )
    emit(df, args.format, args.out)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Everything flor knows about one run."""
    with closing(open_store(args.db, readonly=True)) as conn:
        run = _runs.get_run(conn, args.run)
        ckpts = store.fetch(
            conn,
            "SELECT epoch, step, batch_idx, path, size FROM checkpoints WHERE run_id = ? ORDER BY epoch, step",
            [args.run],
        )
        replays = store.fetch(conn, "SELECT * FROM replays WHERE run_id = ? ORDER BY started", [args.run])
        statuses = _runs.replay_statuses(conn, args.run)  # a killed replay's row could not say so itself
        disk = housekeeping.run_disk_use(conn, args.run)
    for r in replays:
        r["status"] = statuses[r["replay_id"]]
    ends = [c for c in ckpts if c["batch_idx"] is None]
    inside = [c for c in ckpts if c["batch_idx"] is not None]  # at validation points or every N steps
    info = {
        "run": {k: run[k] for k in ("run_id", "project", "script", "host", "pid")} | {"status": _runs.status(run)},
        "argv": _json(run["argv"]),
        "started": str(pd.to_datetime(run["started"], unit="s")),
        "ended": str(pd.to_datetime(run["ended"], unit="s")) if run["ended"] else None,
        "hparams": _json(run["hparams"]),
        "settings": _json(run["settings"]),
        "code": {k: run[k] for k in ("shadow_commit", "head_commit", "branch")},
        "left out of the code snapshot": _json(run.get("left_out")) or "-",
        "checkpoints": {
            "count": len(ckpts),
            "epochs": planner.describe([c["epoch"] for c in ends if c["epoch"] >= 0]) or "-",
            "initial state": any(c["epoch"] < 0 for c in ends),
            "inside epochs": [f"epoch {c['epoch']} step {c['step']} batch {c['batch_idx']}" for c in inside] or "-",
            "bytes": disk["written"],
            "bytes needed": disk["needed"],
            "where": sorted({c["path"].rsplit("/", 1)[0] for c in ckpts}),
        },
        "replays": [
            {k: r[k] for k in ("replay_id", "status", "shadow_commit")} | {"report": _json(r["report"])}
            for r in replays
        ],
        "loggers": json.loads(run["loggers"]) if run.get("loggers") is not None else None,
    }
    if args.format == "json":
        sys.stdout.write(json.dumps(_finite(info), indent=1, default=str, allow_nan=False) + "\n")
    else:
        sys.stdout.write(_sections(info))
    return 0


def _json(text: str | None) -> Any:
    return json.loads(text) if text else {}


def _sections(info: dict[str, Any]) -> str:
    lines = []
    for section, body in info.items():
        if isinstance(body, dict):
            lines.append(f"{section}:")
            lines += [f"  {k}: {_fmt(v)}" for k, v in body.items()]
        elif section == "loggers":
            lines += trackers.show_lines(body)
        elif isinstance(body, list) and section == "replays":
            lines.append(f"replays: {len(body) or 'none'}")
            lines += [_replay_line(r) for r in body]
        else:
            lines.append(f"{section}: {_fmt(body)}")
    return "\n".join(lines) + "\n"


def _replay_line(r: dict[str, Any]) -> str:
    rep = r["report"] or {}
    fidelity = (
        f"re-derived {rep.get('rederived', 0)}, matched {rep.get('matched', 0)}, mismatched {rep.get('mismatched', 0)}"
    )
    epochs = f"restored {_epochs(rep.get('epochs_restored'))}, re-trained {_epochs(rep.get('epochs_trained'))}"
    new = ", ".join(rep.get("new_names", [])) or "-"
    return f"  {r['replay_id']}  {r['status']}  epochs {epochs}; new names: {new}; {fidelity}"


def _epochs(epochs: list[int] | None) -> str:
    return planner.describe(epochs or []) or "-"


def _fmt(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return "-" if v is None else str(v)


def cmd_diff(args: argparse.Namespace) -> int:
    """Hyperparameters that differ, then `git diff` of the two runs' shadow commits."""
    _check_runs(args.db, [args.run_a, args.run_b])
    with closing(open_store(args.db, readonly=True)) as conn:
        rows = {
            r["run_id"]: r
            for r in store.fetch(conn, "SELECT * FROM runs WHERE run_id IN (?, ?)", [args.run_a, args.run_b])
        }
    a, b = rows[args.run_a], rows[args.run_b]
    ha, hb = _json(a["hparams"]), _json(b["hparams"])
    changed = [(k, ha.get(k, "-"), hb.get(k, "-")) for k in sorted(set(ha) | set(hb)) if ha.get(k) != hb.get(k)]
    sys.stdout.write("hparams that differ:\n")
    sys.stdout.write(
        _table(pd.DataFrame(changed, columns=["hparam", args.run_a, args.run_b])) if changed else "  none\n"
    )
    for row in (a, b):
        if not row["shadow_commit"]:
            raise CommandProblem(f"run {row['run_id']} has no code snapshot (it was recorded outside git)")
    done = subprocess.run(
        ["git", "diff", "--no-color", a["shadow_commit"], b["shadow_commit"]],
        cwd=_repo_root(args.db),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise GitError(f"git diff of the shadow commits failed: {done.stderr.strip()}. Run flor from the project.")
    sys.stdout.write(f"code: git diff {a['shadow_commit'][:8]} {b['shadow_commit'][:8]}\n")
    sys.stdout.write(done.stdout or "  no code difference\n")
    return 0


def _repo_root(db: str | None) -> Path:
    """The project repository of the store: the folder above ``.flor/`` or the one around the working directory."""
    path = store_path(db).resolve()
    return path.parent.parent if path.parent.name == ".flor" else locate().root


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete checkpoints of all but the N most recent runs per project."""
    report = housekeeping.gc(keep_last=args.keep_last, dry_run=args.dry_run, db=args.db)
    _housekeeping_output(report, report.freed, args, "would free" if args.dry_run else "freed")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Move checkpoints to another fsspec location, one verified file at a time."""
    _check_runs(args.db, args.run)
    report = housekeeping.push(args.url, runs=args.run, db=args.db)
    _housekeeping_output(report, report.moved, args, "moved")
    return 0


def _housekeeping_output(
    report: housekeeping.HousekeepingReport, items: Sequence[Any], args: argparse.Namespace, verb: str
) -> None:
    emit(_records_frame(items), args.format, args.out)
    # in a terminal the summary follows the table; csv/json on stdout stay pure data
    summary = sys.stdout if args.format == "table" else sys.stderr
    for run_id, why in sorted(report.kept.items()):
        summary.write(f"kept {run_id}: {why}\n")
    summary.write(f"{verb} {report.bytes} bytes ({_human(report.bytes)})\n")


def cmd_plot(args: argparse.Namespace) -> int:
    """Learning curves of the chosen metrics per run."""
    from flor_lightning._plot import plot

    _check_runs(args.db, args.run)
    path = plot(args.names, args.out, run=args.run, x=args.x, db=args.db)
    sys.stderr.write(f"flor: wrote {path}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Send runs' recorded and hindsight values to TensorBoard event files and/or an MLflow tracking URI."""
    from flor_lightning import _tracker_export as tracker_export

    if not (args.tensorboard or args.mlflow):
        raise ConfigError("flor export needs a destination: --tensorboard DIR and/or --mlflow URI")
    _check_runs(args.db, args.run)
    done = tracker_export.export_tensorboard(args.tensorboard, run=args.run, db=args.db) if args.tensorboard else []
    if args.mlflow:
        done += tracker_export.export_mlflow(args.mlflow, experiment=args.experiment, run=args.run, db=args.db)
    emit(_records_frame(done), args.format, args.out)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay every selected past run from its own code version with today's logging."""
    from flor_lightning import _multiversion as multiversion  # imports torch and Lightning: only for this command

    _check_runs(args.db, args.run)
    with contextlib.redirect_stdout(sys.stderr), _workers(args.workers, args.parallel) as (parallel, executor):
        # progress lines go to stderr: stdout carries only the report
        results = multiversion.replay_runs(
            args.where,
            runs=args.run,
            segments=args.segments,
            probe=args.probe,
            propagate=args.propagate,
            parallel=parallel,
            executor=executor,
            train=args.train,
            db=args.db,
        )
    if args.format == "table":
        text = multiversion.format_report(results)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        emit(_records_frame(results), args.format, args.out)
    return 0 if results and all(r.status == "replayed" for r in results) else 1


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the node stores of a replay run on several nodes into this log store, each exactly once."""
    db = store_path(args.db)
    url = nodes.replay_folder(db, args.replay)
    result = nodes.merge(db, url, args.replay, clock=time.time)
    if not result.merged and not result.already:
        raise CommandProblem(
            f"replay {args.replay} has no node store under {url}: it ran on one node, or its other nodes never "
            "ended their segments (the replay's error names each, and how to re-run it)"
        )
    before = f"; merged before: {', '.join(result.already)}" if result.already else ""
    print(
        f"merged {len(result.merged)} node stores of replay {args.replay} from {url}: {result.rows} rows added{before}"
    )
    return 0


@contextlib.contextmanager
def _workers(workers: str | None, parallel: int) -> Iterator[tuple[int, Executor | None]]:
    """``flor replay --workers``: a count is that many local processes (as ``--parallel``); a dask
    scheduler's address (``tcp://host:8786``) or the JSON file ``dask scheduler --scheduler-file``
    writes is that cluster, through ``Client.get_executor()``."""
    if workers is None:
        yield parallel, None
        return
    if parallel != 1:
        raise ConfigError("give --workers or --parallel, not both: --workers N is N local processes")
    if workers.isdigit():
        yield int(workers), None
        return
    if "://" not in workers and not Path(workers).is_file():
        raise ConfigError(
            f"--workers {workers!r} is not a count, a dask scheduler address (tcp://host:8786) or an existing "
            "scheduler file (dask scheduler --scheduler-file FILE)"
        )
    try:
        from distributed import Client
    except ImportError as err:
        raise ConfigError(f"--workers {workers} needs dask's distributed package: pip install distributed") from err
    address = {"address": workers} if "://" in workers else {"scheduler_file": workers}
    try:
        client = Client(**address, timeout=30)  # type: ignore[no-untyped-call]
    except OSError as err:
        raise ConfigError(f"cannot reach the dask scheduler {workers}: {err}") from err
    with client:
        yield 1, client.get_executor()  # type: ignore[no-untyped-call]


# ---- parser ------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, formats: Sequence[str] = FORMATS) -> None:
    p.add_argument("--db", help="the log store (default: .flor/flor.db of this project, or FLOR_DB)")
    p.add_argument("--format", choices=formats, default="table", help="output format (default: table)")
    p.add_argument("--out", help="write the output to this file (needed for parquet)")


def _add(
    sub: Any, name: str, func: Callable[[argparse.Namespace], int], help_text: str, **formats: Any
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=func.__doc__)
    _common(p, **formats)
    p.set_defaults(func=func)
    return p


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``flor``."""
    top = argparse.ArgumentParser(
        prog="flor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _add(sub, "runs", cmd_runs, "list recorded runs")
    p.add_argument("--where", help='a pandas expression over run columns and hparams, e.g. "lr < 0.01"')
    p = _add(sub, "query", cmd_query, "logged values, one row per (run, epoch, step)")
    p.add_argument("names", nargs="*", help="logged names (default: all)")
    p.add_argument("--run", action="append", help="a run id (repeat for several; default: all)")
    p.add_argument("--where", help='a pandas expression over the columns, e.g. "epoch >= 5"')
    p.add_argument("--replayed", action="store_true", help="add <name>@replay columns with replayed values")
    p.add_argument("--unfinished", action="store_true", help="also values of replays that failed, crashed or still run")
    p = _add(
        sub, "show", cmd_show, "hparams, code version, checkpoints and replays of a run", formats=("table", "json")
    )
    p.add_argument("run", help="the run id")
    p = _add(sub, "diff", cmd_diff, "code and hparam differences between two runs", formats=("table",))
    p.add_argument("run_a")
    p.add_argument("run_b")
    p = _add(sub, "replay", cmd_replay, "replay past runs, each from its own code version")
    p.add_argument("--where", help='which runs: a pandas expression over run columns and hparams, e.g. "lr < 0.01"')
    p.add_argument("--run", action="append", help="a run id (repeat for several)")
    p.add_argument("--segments", type=int, default=1, help="segments per run (default: 1)")
    p.add_argument("--probe", help="a Callback applied to every version: path/to/file.py:ClassName")
    p.add_argument("--no-propagate", dest="propagate", action="store_false", help="do not merge new self.log lines")
    p.add_argument("--parallel", type=int, default=1, help="runs replayed at once (default: 1)")
    p.add_argument(
        "--workers",
        metavar="N|ADDRESS|FILE",
        help="N local processes, or a dask cluster: its scheduler's address (tcp://host:8786) or scheduler file",
    )
    p.add_argument(
        "--train", action=argparse.BooleanOptionalAction, default=None, help="force re-training or restoring"
    )
    p = sub.add_parser("merge", help="merge a multi-node replay's node stores", description=cmd_merge.__doc__)
    p.add_argument("--db", help="the log store (default: .flor/flor.db of this project, or FLOR_DB)")
    p.add_argument("replay", help="the replay id")
    p.set_defaults(func=cmd_merge)
    p = _add(sub, "export", cmd_export, "send runs' values to TensorBoard event files or an MLflow tracking URI")
    p.add_argument("--tensorboard", metavar="DIR", help="write a TensorBoard run folder per run under DIR")
    p.add_argument("--mlflow", metavar="URI", help="write an MLflow run per run there, e.g. sqlite:///mlflow.db")
    p.add_argument("--experiment", help="the MLflow experiment (default: each run's project)")
    p.add_argument("--run", action="append", help="a run id (repeat for several; default: all)")
    p = _add(sub, "gc", cmd_gc, "delete checkpoints of older runs")
    p.add_argument("--keep-last", type=int, required=True, metavar="N", help="runs to keep per project")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    p = _add(sub, "push", cmd_push, "move checkpoints to another fsspec location")
    p.add_argument("url", help="destination, e.g. s3://bucket/flor or /mnt/archive/flor")
    p.add_argument("--run", action="append", help="a run id (repeat for several; default: all)")
    p = sub.add_parser("plot", help="draw learning curves into an image", description=cmd_plot.__doc__)
    p.add_argument("--db", help="the log store (default: .flor/flor.db of this project, or FLOR_DB)")
    p.add_argument("names", nargs="+", help="logged names to draw")
    p.add_argument("--run", action="append", help="a run id (repeat for several; default: all)")
    p.add_argument("--x", choices=("epoch", "step"), default="epoch", help="x axis (default: epoch)")
    p.add_argument("--out", required=True, help="image file, e.g. curves.png")
    p.set_defaults(func=cmd_plot)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flor`` with ``argv`` (default: the process arguments); return the exit code."""
    args = parser().parse_args(argv)  # exits 2 on a usage error
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"flor: {err}", file=sys.stderr)
        return 2
    except FlorError as err:
        print(f"flor: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `flor query | head`: the reader left, which is no error of ours
        with contextlib.suppress(OSError, ValueError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stops the interpreter's exit-time flush error)
        return 0


if __name__ == "__main__":
    sys.exit(main())
