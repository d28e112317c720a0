"""Replay past runs, each from its own code version, with today's new logging brought in.

For each selected run: its shadow commit is checked out in a temporary ``git worktree``, the
new logging is brought in (a *probe* callback, and/or the edits made since the latest
recorded version merged in, see :mod:`flor_lightning._propagate`), and the recorded script is
run there with its recorded arguments by :mod:`flor_lightning._version_runner`, which turns the
script's ``Trainer.fit`` into a replay of that run. Values land in the original log store.
The user's HEAD, branch, index and files are never touched; worktrees are removed afterwards.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, ThreadPoolExecutor, as_completed
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import git
import pandas as pd
from lightning.pytorch.callbacks import Callback

from flor_lightning import _planner as planner
from flor_lightning import _propagate as merging
from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._errors import ConfigError, GitError
from flor_lightning._locate import locate
from flor_lightning._query import filter_rows, run_info, store_path
from flor_lightning._query import runs as runs_table
from flor_lightning._segments import REPLAY_ID_ENV
from flor_lightning._shadow import SHADOW_BRANCH, has_commit
from flor_lightning._table import text_table

# What `where` can name besides the hyperparameters (a clashing hyperparameter is ``hparam.<name>``).
RUN_FRAME_COLUMNS = ("run_id", "project", "started", "status", "script", "shadow_commit", "head_commit", "branch")
_GIT_LOCK = threading.Lock()  # worktree add/remove of concurrent replays, one at a time


@dataclass
class VersionReplay:
    """The outcome of replaying one run from its own code version.

    Attributes:
        run_id: the replayed run.
        status: ``replayed``, ``skipped`` (nothing was run; ``reason`` says why) or ``failed``.
        merge: ``merged`` (edits written into the version), ``unchanged`` (no edit to bring),
            ``conflict``, ``probe only`` (propagation off) or ``-`` (nothing brought in).
        reason: why it was skipped or failed, or the files merged (and the changed files left out).
        replay_id: the replay's id in the log store (values carry it), when it ran.
        epochs_restored: epochs restored from checkpoints.
        epochs_trained: epochs whose training batches ran again.
        matched: recorded values logged again and equal bit for bit.
        mismatched: recorded values logged again that differ.
        new_names: names the recording did not have (the hindsight metrics).
        seconds: wall time of this run's replay, worktree included.
        log: the file with the replay process's output, when it ran.
        left_out: changed files that are not code (logs, outputs), never merged into the version.
    """

    run_id: str
    status: str
    merge: str
    reason: str = ""
    replay_id: str | None = None
    epochs_restored: list[int] = field(default_factory=list)
    epochs_trained: list[int] = field(default_factory=list)
    matched: int = 0
    mismatched: int = 0
    new_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log: str | None = None
    left_out: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VersionTask:
    """One version's replay, self-contained and picklable: what :func:`replay_version` needs to run it
    on any machine that sees the repository at ``root``, the log store ``db`` and the checkpoints.

    ``replay_id`` is chosen before the task is sent, so a task run again (a retry after its worker
    died) replays under the same id: a try that finished is not run again, and what an unfinished
    try stored is deleted before the next one runs. ``log`` gets the output of every try.
    """

    run: dict[str, Any]
    root: Path
    db: Path
    edits: merging.Edits | None
    probe: str | None
    segments: int
    train: bool | None
    share: tuple[str, ...]
    timeout: float | None
    replay_id: str
    log: Path


def replay_runs(
    where: str | None = None,
    *,
    runs: Sequence[str] | None = None,
    segments: int = 1,
    probe: str | type[Callback] | None = None,
    propagate: bool = True,
    parallel: int = 1,
    executor: Executor | None = None,
    train: bool | None = None,
    db: str | Path | None = None,
    base: str | None = None,
    share: Sequence[str] = (),
    timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> list[VersionReplay]:
    """Replay past runs, each from its own code version, with the new logging brought in.

    Args:
        where: a pandas expression over the runs table (run_id, started, status, script,
            shadow_commit, head_commit, branch and each hyperparameter), e.g. ``"lr < 0.01"``,
            choosing among the runs that can be replayed (with a code snapshot and checkpoints).
        runs: run ids to replay (with ``where``: those of them that match); one that cannot be
            replayed is reported ``skipped`` with the reason.
        segments: replay each run in this many segments, one after another.
        probe: a Callback class (defined at module level in a file) or ``"path/to/file.py:ClassName"``,
            instantiated with no arguments and added to each version's Trainer during its replay.
        propagate: merge the edits made since ``base`` into each version; a version where they
            conflict is skipped with the files named.
        parallel: replay up to this many runs at once, each in its own process.
        executor: a :class:`concurrent.futures.Executor` to run each version's replay on (one
            :class:`VersionTask` each, given to :func:`replay_version`), e.g. a dask cluster's
            ``Client.get_executor()``; its workers must see the repository, the log store and the
            checkpoints at the same paths. Default: ``parallel`` local processes.
        train: re-train (True), restore only (False) or decide per version (None).
        db: the log store (default: this project's).
        base: the commit today's edits started from (default: the shadow commit of the latest
            recorded run of each run's script).
        share: repo-relative paths (e.g. an ignored ``data`` folder) linked into each version's
            checkout, for files the code snapshot leaves out.
        timeout: seconds after which a version's replay process is killed and reported failed.
        echo: where the one-line progress messages go.

    Returns:
        One :class:`VersionReplay` per selected run, oldest run first.

    Raises:
        UnknownRunError: a run id the store does not hold.
        ConfigError: bad arguments, or a ``where`` that selects nothing.

    Example:
        >>> import flor_lightning as flor
        >>> print(flor.format_report(flor.replay_runs("lr < 0.01", parallel=2)))  # doctest: +SKIP
    """
    _check_arguments(segments, parallel, train, share, executor)
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"timeout must be a number of seconds > 0 (or None), got {timeout!r}")
    probe_spec = probe_reference(probe) if probe is not None else None
    loc = locate()
    if not loc.in_git:
        raise ConfigError(f"{loc.root} is not in a git repository; run from the project that recorded the runs")
    missing = [p for p in share if not (loc.root / p).exists()]
    if missing:
        raise ConfigError(f"share paths {missing} do not exist under {loc.root}; share existing files or folders")
    db_path = store_path(db).resolve()
    table = run_info(runs_table(db=db_path), RUN_FRAME_COLUMNS)
    with closing(store.connect(db_path)) as conn:
        rows = {r["run_id"]: r for r in store.fetch(conn, "SELECT * FROM runs")}
        with_ckpt = {r["run_id"] for r in store.fetch(conn, "SELECT DISTINCT run_id FROM checkpoints")}
    problems = {
        run_id: _unfit(rows[run_id], run_id in with_ckpt, status)
        for run_id, status in zip(table["run_id"], table["status"], strict=True)
    }
    bases = {} if base is not None else _bases(table)
    if runs is None:  # choose among the runs that can be replayed; named runs that cannot are reported
        table = table[[problems[r] is None for r in table["run_id"]]]
    chosen = select_runs(table, where, runs)
    edits: dict[tuple[str, tuple[str, ...]], merging.Edits] = {}
    results: dict[str, VersionReplay] = {}
    tasks = []
    for run_id in chosen:
        row = rows[run_id]
        problem = problems[run_id] or _missing_commit(loc.root, row["shadow_commit"])
        if problem:
            results[run_id] = VersionReplay(run_id, "skipped", "-", problem)
            continue
        start = base or bases.get(row["script"]) or row["shadow_commit"]
        configs = merging.named_configs(json.loads(row["argv"] or "[]"), loc.root / (row.get("cwd") or ""), loc.root)
        if propagate and (start, configs) not in edits:
            edits[start, configs] = merging.edits_since(loc.root, start, configs=configs)
        todo = edits[start, configs] if propagate else None
        replay_id = f"{run_id}.r{uuid.uuid4().hex[:6]}"
        log = db_path.parent / "replay-logs" / f"{run_id}.{time.strftime('%Y%m%d-%H%M%S')}-{replay_id[-6:]}.log"
        tasks.append(
            VersionTask(
                row, loc.root, db_path, todo, probe_spec, segments, train, tuple(share), timeout, replay_id, log
            )
        )
    if executor is None:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for result in pool.map(lambda task: _echoed(task, echo), tasks):
                results[result.run_id] = result
    else:
        results.update((r.run_id, r) for r in _on_executor(executor, tasks, echo))
    return [results[r] for r in chosen]


def _echoed(task: VersionTask, echo: Callable[[str], None]) -> VersionReplay:
    echo(f"flor: run {task.run['run_id']}: replaying from version {task.run['shadow_commit'][:10]} ...")
    result = replay_version(task)
    echo(_ended(result))
    return result


def _ended(result: VersionReplay) -> str:
    return (
        f"flor: run {result.run_id}: {result.status} ({result.merge}) in {result.seconds:.1f}s {result.reason}".rstrip()
    )


def _on_executor(executor: Executor, tasks: list[VersionTask], echo: Callable[[str], None]) -> Iterator[VersionReplay]:
    """Each task's result from ``executor``, as they come; a task that raised or whose worker died
    (a dask ``KilledWorker``, a ``BrokenProcessPool``) is a failed replay naming the error and its log."""
    futures = {}
    for task in tasks:
        futures[executor.submit(replay_version, task)] = task
        version = task.run["shadow_commit"][:10]
        echo(f"flor: run {task.run['run_id']}: sent to {type(executor).__name__} (version {version})")
    for future in as_completed(futures):
        task = futures[future]
        try:
            result = future.result()
        except (Exception, CancelledError) as err:
            why = f"its task failed on the executor: {type(err).__name__}: {err}".strip()
            result = VersionReplay(
                task.run["run_id"], "failed", "-", why, log=str(task.log) if task.log.exists() else None
            )
        echo(_ended(result))
        yield result


def _check_arguments(
    segments: int, parallel: int, train: bool | None, share: Sequence[str], executor: Executor | None
) -> None:
    planner.validate_segment_args(segments, None)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"parallel must be a whole number >= 1 (replays at once), got {parallel!r}")
    if executor is not None and (parallel != 1 or not isinstance(executor, Executor)):
        raise ConfigError(
            f"executor must be a concurrent.futures.Executor (e.g. dask's Client.get_executor()), got {executor!r}, "
            "and it sets how many replays run at once: leave parallel at 1"
        )
    if train not in (None, True, False):
        raise ConfigError(f"train must be None (decide per version), True or False, got {train!r}")
    for path in share:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise ConfigError(f"share paths are relative to the repository root, inside it; got {path!r}")


def probe_reference(probe: str | type[Callback]) -> str:
    """``"/abs/file.py:Qual.Name"`` for a probe given as a class or as ``"file.py:ClassName"``.

    Raises:
        ConfigError: the file or class does not exist, or it is not a Lightning Callback.
    """
    if isinstance(probe, type):
        if not issubclass(probe, Callback):
            raise ConfigError(f"probe {probe.__qualname__} is not a lightning Callback; subclass Callback")
        if probe.__module__ == "__main__":
            raise ConfigError(
                f"probe {probe.__qualname__} is defined in the script being run; define it in its own module "
                "(e.g. probes.py): each replay process loads the probe's file, and loading this script would run it"
            )
        if "<locals>" in probe.__qualname__:
            raise ConfigError(f"probe {probe.__qualname__} is defined inside a function; define it at module level")
        try:
            source = inspect.getsourcefile(probe)
        except TypeError:
            source = None
        if not source:
            raise ConfigError(f"probe {probe.__qualname__} has no source file; define it in a .py file")
        return f"{Path(source).resolve()}:{probe.__qualname__}"
    if not isinstance(probe, str) or ":" not in probe:
        raise ConfigError(f"probe must be a Callback class or 'path/to/file.py:ClassName', got {probe!r}")
    file, _, qualname = probe.rpartition(":")
    path = Path(file).resolve()
    cls = load_probe(path, qualname)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"probe {probe!r} is not a lightning Callback class; subclass Callback")
    return f"{path}:{qualname}"


def load_probe(path: Path, qualname: str) -> Any:
    """The object ``qualname`` of file ``path``, loaded under a unique module name.

    The unique name keeps a same-named module of an older code version from shadowing the file.

    Raises:
        ConfigError: the file or the name does not exist.
    """
    if not path.is_file():
        raise ConfigError(f"probe file {str(path)!r} does not exist; give 'path/to/file.py:ClassName'")
    name = f"flor_probe_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"probe file {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"probe file {str(path)!r} has no {qualname!r}")
        obj = getattr(obj, part)
    return obj


def select_runs(table: pd.DataFrame, where: str | None, runs: Sequence[str] | None) -> list[str]:
    """The run ids chosen by ``runs`` and ``where`` over ``table``, oldest first.

    Raises:
        UnknownRunError: a run id the table does not hold.
        ConfigError: a ``where`` that fails or matches nothing, or no runs at all.
    """
    if isinstance(runs, str):
        runs = [runs]
    if runs is not None and not runs:
        raise ConfigError("runs=[] selects nothing; pass run ids, or None to choose among all runs")
    if runs is not None:
        _runs.check_listed(runs, dict(zip(table["run_id"], table["started"], strict=True)))
        table = table[table["run_id"].isin(list(runs))]
    if where:
        table = filter_rows(table, where, label="where=")
        if table.empty:
            raise ConfigError(
                f"where={where!r} matches none of the runs that can be replayed (with a code snapshot and "
                f"checkpoints). Columns: {', '.join(map(str, table.columns))}"
            )
    if table.empty:
        raise ConfigError(
            "no run to replay: none has a code snapshot and checkpoints. Record one with flor.Trainer(...).fit(...) "
            "in a git repository first"
        )
    return list(table.sort_values(["started", "run_id"], kind="stable")["run_id"])


def _bases(table: pd.DataFrame) -> dict[str | None, str]:
    """Each script's latest shadow commit: the code today's edits most likely started from."""
    done = table[table["shadow_commit"].notna()].sort_values(["started", "run_id"], kind="stable")
    return {script: commit for script, commit in zip(done["script"], done["shadow_commit"], strict=True)}


def _unfit(row: dict[str, Any], has_checkpoints: bool, status: str) -> str | None:
    """Why a run cannot be replayed from its version, or None."""
    if not row["shadow_commit"]:
        return "no code snapshot (recorded outside git)"
    if not has_checkpoints:
        return "no checkpoints"
    if status == "running":
        return "still recording"
    if not row["script"] or Path(row["script"]).is_absolute():
        return f"its script {row['script']!r} is not inside the repository"
    return None


def _missing_commit(root: Path, commit: str) -> str | None:
    with git.Repo(root) as repo:
        if not has_commit(repo, commit):
            return f"its shadow commit {commit[:10]} is not in this repository (fetch {SHADOW_BRANCH})"
    return None


@contextmanager
def checkout(root: Path, commit: str, name: str, key: str | None = None) -> Iterator[Path]:
    """A temporary detached ``git worktree`` of ``commit``, removed (and pruned) afterwards.

    With ``key`` its folder is named by it, and one left by an earlier holder of the key (a try of
    the same task whose worker was killed, so it could not remove it) is removed first.
    """
    tmp = Path(tempfile.gettempdir()) / f"flor-version-{key}" if key else Path(tempfile.mkdtemp(prefix="flor-version-"))
    path = tmp / name
    if key and tmp.exists():
        _remove_worktree(root, path)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        try:
            with _GIT_LOCK, git.Repo(root) as repo:
                repo.git.worktree("add", "--detach", str(path), commit)
        except git.exc.GitError as err:
            raise GitError(f"could not check out {commit[:10]} in a temporary worktree: {err}") from err
        yield path
    finally:
        _remove_worktree(root, path)


def _remove_worktree(root: Path, path: Path) -> None:
    with _GIT_LOCK, git.Repo(root) as repo:
        repo.git.worktree("remove", "--force", str(path), with_exceptions=False)
        shutil.rmtree(path.parent, ignore_errors=True)
        repo.git.worktree("prune", with_exceptions=False)


def replay_version(task: VersionTask) -> VersionReplay:
    """Replay one version (the function an executor runs): check it out, bring the edits in, run it.

    Any failure is returned as a ``failed`` :class:`VersionReplay`, never raised, so one version's
    trouble does not stop the others.
    """
    started = time.monotonic()
    try:
        result = _in_worktree(task)
    except Exception as err:
        result = VersionReplay(task.run["run_id"], "failed", "-", f"{type(err).__name__}: {err}")
    result.seconds = time.monotonic() - started
    return result


def _in_worktree(job: VersionTask) -> VersionReplay:
    run, run_id = job.run, job.run["run_id"]
    with checkout(job.root, run["shadow_commit"], job.root.name, key=job.replay_id) as tree:
        merge = "probe only" if job.probe else "-"
        reason = ""
        if job.edits is not None:
            merged = merging.merge_into(tree, run["shadow_commit"], job.edits)
            if merged.conflicts:
                files = merging.describe(merged.conflicts)
                return VersionReplay(run_id, "skipped", "conflict", f"the edits conflict with this version in {files}")
            merge, reason = merged.status, (f"merged {merging.describe(merged.written)}" if merged.written else "")
            if merged.binary:
                reason = f"{reason}; binary files not brought in: {merging.describe(merged.binary)}".lstrip("; ")
            if job.edits.left_out:
                reason = f"{reason}; left out (not code): {merging.summarize(job.edits.left_out)}".lstrip("; ")
        for path in job.share:
            _link(job.root / path, tree / path)
        result = _run(job, tree, merge, reason)
        result.left_out = list(job.edits.left_out) if job.edits is not None else []
        return result


def _link(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        return  # the version has its own
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source, target_is_directory=source.is_dir())


def _run(job: VersionTask, tree: Path, merge: str, reason: str) -> VersionReplay:
    run_id, log = job.run["run_id"], job.log
    earlier = _claim(job.db, job.replay_id)
    if earlier is not None:
        note = "; ".join(filter(None, [reason, "replayed by an earlier try of this task, not run again"]))
        return _replayed(run_id, merge, note, earlier, log)
    log.parent.mkdir(parents=True, exist_ok=True)
    report_file = log.with_suffix(".json")
    cmd = [sys.executable, "-m", "flor_lightning._version_runner", "--run", run_id, "--segments", str(job.segments)]
    cmd += ["--report", str(report_file), "--train", {None: "auto", True: "true", False: "false"}[job.train]]
    cmd += ["--parent", str(os.getpid())]
    cmd += ["--probe", job.probe] if job.probe else []
    cmd += ["--", str(tree / job.run["script"]), *json.loads(job.run["argv"] or "[]")]
    env = {**os.environ, "FLOR_DB": str(job.db), REPLAY_ID_ENV: job.replay_id}
    cwd = _working_dir(tree, job.run.get("cwd"))
    # as `python <script>` from a shell: a seed set in this process (seed_everything) must not leak in
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        env.pop(var, None)
    try:
        with log.open("a") as out:  # a retried task's tries follow one another in its log
            done = subprocess.run(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=job.timeout
            )
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return VersionReplay(run_id, "failed", merge, f"timed out after {job.timeout}s and was killed", log=str(log))
    if done.returncode != 0 or not report_file.exists():
        return VersionReplay(run_id, "failed", merge, _last_error(log, done.returncode), log=str(log))
    report = json.loads(report_file.read_text())
    report_file.unlink()
    return _replayed(run_id, merge, reason, report, log)


def _replayed(run_id: str, merge: str, reason: str, report: dict[str, Any], log: Path) -> VersionReplay:
    return VersionReplay(
        run_id,
        "replayed",
        merge,
        reason,
        replay_id=report["replay_id"],
        epochs_restored=report["epochs_restored"],
        epochs_trained=report["epochs_trained"],
        matched=report["matched"],
        mismatched=report["mismatched"],
        new_names=report["new_names"],
        log=str(log),
    )


# the tables holding a replay's records, by replay_id
_REPLAY_TABLES = ("logs", "replay_epochs", "replay_bad_checkpoints", "replay_segments", "replays")


def _claim(db: Path, replay_id: str) -> dict[str, Any] | None:
    """Make a task's try the only one holding ``replay_id``: the report of an earlier try that
    finished (nothing is run again), or None once what an unfinished earlier try stored is gone."""
    with closing(store.connect(db)) as conn, store.immediate(conn):
        rows = store.fetch(conn, "SELECT status, report FROM replays WHERE replay_id = ?", [replay_id])
        if rows and rows[0]["status"] == "finished" and rows[0]["report"]:
            report: dict[str, Any] = json.loads(rows[0]["report"])
            return report
        for table in _REPLAY_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE replay_id = ?", [replay_id])
    return None


def _working_dir(tree: Path, recorded: str | None) -> Path:
    """The recording's working directory in the checkout (one outside the repository as it is);
    the checkout's root for runs recorded before flor kept it, or when the folder is not there."""
    path = tree / recorded if recorded else tree  # an absolute ``recorded`` replaces ``tree``
    return path if path.is_dir() else tree


def _last_error(log: Path, code: int) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("flor: error")]
    return (errors or lines or [f"the replay process exited with status {code}"])[-1][:300]


def format_report(results: list[VersionReplay]) -> str:
    """A table of :func:`replay_runs`'s results, one line per run, then the logs of failed runs."""
    header = ["run", "status", "merge", "restored", "re-trained", "matched", "mismatched", "new names", "time", "note"]
    lines = [
        [
            r.run_id,
            r.status,
            r.merge,
            planner.describe(r.epochs_restored) or "-",
            planner.describe(r.epochs_trained) or "-",
            str(r.matched) if r.status == "replayed" else "-",
            str(r.mismatched) if r.status == "replayed" else "-",
            ", ".join(r.new_names) or "-",
            f"{r.seconds:.1f}s",
            r.reason,
        ]
        for r in results
    ]
    text = text_table(header, lines)
    text += [f"log of {r.run_id}: {r.log}" for r in results if r.status == "failed" and r.log]
    return "\n".join(text)
