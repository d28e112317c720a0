"""Stash housekeeping: free checkpoint space (:func:`gc`) and move checkpoints elsewhere (:func:`push`).

Both work on the checkpoint index of the log store and the files it names, and both leave
alone the runs that are in use: a run still recording, and a run with an unfinished replay
(status ``running`` in ``replays`` and a segment process that may be alive, or no segment
started yet and the process that registered the replay alive). The order of their steps is
chosen so that killing them at any moment loses no checkpoint the index names:

- ``gc`` deletes a run's index rows first (one transaction) and its files after. Killed in
  between, the files are orphans nobody reads; the next ``gc`` removes them with the run's folder.
- ``push`` copies a file to a temporary name at the destination, renames it into place, checks
  the copy's sha256 against the index, and only then points the index row at the copy and
  deletes the local file. Killed at any step, the index names a complete file with the
  recorded checksum; running ``push`` again finishes the move (and removes the unfinished
  temporary copy or the local file a kill left behind).

Checkpoints are manifests plus packs of tensor blobs shared by every run under one checkpoint root
(:mod:`flor_lightning._checkpoints`); the index lists the packs each manifest references, so both decide by
reference from the index alone:

- ``gc`` deletes a pack only when no checkpoint still indexed (of any run, kept or busy) references it. Packs
  no row references at all (a writer killed between its pack and its manifest, a gc killed before its files)
  and the temporary files of pack writes killed midway are swept too, but only under a root where no run is
  recording (a write in flight has no row yet).
- ``push`` copies the packs a manifest references to the destination (``<url>/<project>/packs``) before the
  manifest itself, and deletes a local pack only once no checkpoint still indexed locally references it, so
  every checkpoint stays loadable wherever the index says it is, local or pushed, at any moment.

Runs recorded before manifests (one ``.ckpt`` file per checkpoint) are collected and pushed file by file as before.

Both decide "in use" and change the index in one ``BEGIN IMMEDIATE`` transaction, so a replay
cannot register in between and then find its checkpoints gone. ``push`` never deletes a file
that is the destination under another spelling (a symlinked folder, ``..``, a relative path:
compared by device and inode), and refuses a destination no other process can read (``memory://``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import sqlite3
from collections.abc import Collection, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from flor_lightning import _runs
from flor_lightning import _store as store
from flor_lightning._atomic import TEMPORARY, atomic
from flor_lightning._errors import CheckpointError, ConfigError
from flor_lightning._locate import PACKS, check_writable, fs_for, open_fs, process_local, protocol, split
from flor_lightning._query import open_store

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Freed:
    """What :func:`gc` removed (or, with ``dry_run``, would remove) for one run."""

    run_id: str
    project: str
    files: int
    bytes: int


@dataclass(frozen=True)
class Moved:
    """One checkpoint file :func:`push` moved."""

    run_id: str
    epoch: int
    source: str
    destination: str
    bytes: int


@dataclass
class HousekeepingReport:
    """What :func:`gc` or :func:`push` did; ``kept`` maps a run left alone to the reason."""

    freed: list[Freed] = field(default_factory=list)
    moved: list[Moved] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.freed) + sum(m.bytes for m in self.moved)


def busy_runs(conn: sqlite3.Connection, *, host: str | None = None) -> dict[str, str]:
    """Runs in use, with the reason: still recording, or needed by an unfinished replay."""
    host = host or socket.gethostname()
    busy: dict[str, str] = {}
    for r in store.fetch(conn, "SELECT run_id, status, pid, host FROM runs WHERE status = 'running'"):
        if _runs.status(r, host) == "running":
            busy[r["run_id"]] = "still recording"
    replays = store.fetch(conn, "SELECT replay_id, run_id FROM replays WHERE status = 'running'")
    for rp in replays:
        if _runs.replay_alive(conn, rp["replay_id"], host):
            busy.setdefault(rp["run_id"], f"replay {rp['replay_id']} is unfinished")
    return busy


def select_for_gc(
    runs: Sequence[dict[str, Any]], keep_last: int, busy: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Pure choice of :func:`gc`: the runs whose checkpoints go, and the kept ones with why.

    ``runs`` are rows with run_id, project and started; per project the ``keep_last`` most
    recently started runs are kept, and so is every run in ``busy``.
    """
    collect: list[str] = []
    kept: dict[str, str] = {}
    by_project: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_project.setdefault(r["project"], []).append(r)
    for rows in by_project.values():
        rows = sorted(rows, key=lambda r: (r["started"], r["run_id"]), reverse=True)
        for i, r in enumerate(rows):
            if i < keep_last:
                kept[r["run_id"]] = f"one of the {keep_last} most recent runs of project {r['project']!r}"
            elif r["run_id"] in busy:
                kept[r["run_id"]] = busy[r["run_id"]]
            else:
                collect.append(r["run_id"])
    return collect, kept


def gc(*, keep_last: int, dry_run: bool = False, db: str | Path | None = None) -> HousekeepingReport:
    """Delete the checkpoints of all but the ``keep_last`` most recent runs of each project.

    Logged values, run rows and code snapshots stay; only checkpoint files and their index rows
    go, so those runs can no longer be replayed from memoized epochs. A run still recording or
    with an unfinished replay is never touched.

    Example:
        >>> import flor_lightning as flor
        >>> flor.gc(keep_last=5, dry_run=True).bytes  # doctest: +SKIP

    Raises:
        ConfigError: ``keep_last`` is not a non-negative integer.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ConfigError(f"keep_last must be an integer >= 0 (runs to keep per project), got {keep_last!r}")
    report = HousekeepingReport(dry_run=dry_run)
    # no replay can register between the check and the index delete
    with closing(open_store(db)) as conn, store.immediate(conn):
        runs = store.fetch(conn, "SELECT run_id, project, started, checkpoint_root FROM runs")
        busy = busy_runs(conn)
        collect, report.kept = select_for_gc(runs, keep_last, busy)
        roots = {r["run_id"]: r["checkpoint_root"] for r in runs}
        files = {
            run_id: store.fetch(conn, "SELECT path, size, packs FROM checkpoints WHERE run_id = ?", [run_id])
            for run_id in collect
        }
        if not dry_run:
            conn.executemany("DELETE FROM checkpoints WHERE run_id = ?", [[r] for r in collect])
        # what every checkpoint that stays references (in a dry run, the collected ones are still indexed)
        referenced = referenced_packs(conn, exclude=set(collect))
    project = {r["run_id"]: r["project"] for r in runs}
    gone = set(referenced)  # packs kept or already freed (a dry run deletes nothing, so counts each once)
    for run_id in collect:
        count, size = _remove_run_files(files[run_id], roots[run_id], run_id, dry_run=dry_run)
        packs = _remove_packs(files[run_id], roots[run_id], gone, dry_run=dry_run)
        if count or packs[0]:
            report.freed.append(Freed(run_id, project[run_id], count + packs[0], size + packs[1]))
    recording = {run_id for run_id, why in busy.items() if why == "still recording"}
    idle_roots = {(r["checkpoint_root"], r["project"]) for r in runs if r["checkpoint_root"]}
    idle_roots -= {(roots[r], project[r]) for r in recording if r in roots}
    for root, proj in sorted(idle_roots):
        count, size = _sweep_packs(root, gone, dry_run=dry_run)
        if count:
            report.freed.append(Freed(UNREFERENCED, proj, count, size))
    return report


UNREFERENCED = "(unreferenced packs)"
"""The ``run_id`` of :class:`Freed` for the packs no checkpoint referenced (a killed write's, a killed gc's)."""


def pack_location(path: str, root: str | None, pack: str) -> tuple[AbstractFileSystem, str]:
    """Where a checkpoint's pack lies: beside its manifest's run folder, ``<root>/packs/<id>``."""
    fs, where = fs_for(path, root)
    return fs, f"{split(where)[0]}/{pack}"


def file_key(fs: AbstractFileSystem, path: str) -> str:
    """One spelling per file: a local path resolved (symlinks, ``..``), elsewhere the URL."""
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else str(fs.unstrip_protocol(path))


def referenced_packs(conn: sqlite3.Connection, *, exclude: Collection[str] = ()) -> set[str]:
    """Every pack an indexed checkpoint references (runs in ``exclude`` left out), as :func:`file_key` s."""
    found: set[str] = set()
    sql = "SELECT c.run_id, c.path, c.packs, r.checkpoint_root FROM checkpoints c JOIN runs r USING (run_id)"
    for r in store.fetch(conn, sql + " WHERE c.packs IS NOT NULL"):
        if r["run_id"] not in exclude:
            found.update(file_key(*pack_location(r["path"], r["checkpoint_root"], p)) for p in json.loads(r["packs"]))
    return found


def _remove_packs(rows: list[dict[str, Any]], root: str | None, skip: set[str], *, dry_run: bool) -> tuple[int, int]:
    """Delete the packs the collected checkpoints ``rows`` reference, but those in ``skip`` (referenced by a
    checkpoint that stays, or freed already); each one deleted joins ``skip``."""
    count = size = 0
    for r in rows:
        for pack in json.loads(r["packs"] or "[]"):
            fs, path = pack_location(r["path"], root, pack)
            key = file_key(fs, path)
            if key in skip:
                continue
            skip.add(key)
            if fs.exists(path):
                count, size = count + 1, size + int(fs.size(path))
                if not dry_run:
                    fs.rm(path)
    return count, size


def _sweep_packs(root: str, skip: set[str], *, dry_run: bool) -> tuple[int, int]:
    """Delete the packs under ``root`` but those in ``skip`` (referenced, or freed already), and the temporary
    files of pack writes that never finished (a killed writer's); no run records there."""
    fs, base = open_fs(root)
    count = size = 0
    for path in fs.glob(f"{base}/{PACKS}/*.safetensors*"):  # <id>.safetensors and <id>.safetensors.tmp-<hex>
        if (key := file_key(fs, path)) not in skip:
            skip.add(key)
            count, size = count + 1, size + int(fs.size(path))
            if not dry_run:
                fs.rm(path)
    return count, size


def _remove_run_files(rows: list[dict[str, Any]], root: str | None, run_id: str, *, dry_run: bool) -> tuple[int, int]:
    """Delete the indexed files of a run (manifests, or old .ckpt files), then whatever is left in its folder
    (orphans of a killed gc)."""
    count = size = 0
    indexed = set()
    for r in rows:
        fs, path = fs_for(r["path"], root)
        indexed.add(fs.unstrip_protocol(path))
        if fs.exists(path):
            count, size = count + 1, size + int(fs.size(path))
            if not dry_run:
                fs.rm(path)
    if root:
        fs, base = open_fs(root)
        folder = f"{base}/{run_id}"
        if fs.isdir(folder):
            for left in fs.find(folder):
                if fs.unstrip_protocol(left) not in indexed:
                    count, size = count + 1, size + int(fs.size(left) or 0)
            if not dry_run:
                fs.rm(folder, recursive=True)
    return count, size


# ---- disk use ---------------------------------------------------------------------------------------


def run_disk_use(conn: sqlite3.Connection, run_id: str) -> dict[str, int]:
    """What ``run_id``'s checkpoints take: ``written``, the bytes they added to the store (blobs another
    checkpoint had stored already cost nothing); ``needed``, their manifests plus every pack they reference
    (shared ones included), what replaying the run reads."""
    rows = store.fetch(
        conn,
        "SELECT c.path, c.size, c.packs, r.checkpoint_root FROM checkpoints c JOIN runs r USING (run_id) "
        "WHERE run_id = ?",
        [run_id],
    )
    needed: dict[str, int] = {}
    for r in rows:
        fs, path = fs_for(r["path"], r["checkpoint_root"])
        files = [
            (fs, path),
            *(pack_location(r["path"], r["checkpoint_root"], p) for p in json.loads(r["packs"] or "[]")),
        ]
        for fs, where in files:
            key = file_key(fs, where)
            if key not in needed and fs.exists(where):
                needed[key] = int(fs.size(where))
    return {"written": sum(int(r["size"]) for r in rows), "needed": sum(needed.values())}


def project_disk_use(conn: sqlite3.Connection) -> dict[str, int]:
    """Per project, the bytes of every file under its runs' checkpoint roots (manifests and packs, each once)."""
    seen: dict[str, tuple[str, int]] = {}
    for r in store.fetch(conn, "SELECT DISTINCT project, checkpoint_root FROM runs WHERE checkpoint_root IS NOT NULL"):
        fs, base = open_fs(r["checkpoint_root"])
        if not fs.exists(base):  # pushed away, or kept in the memory of a process that ended
            continue
        for path, info in fs.find(base, detail=True).items():
            seen.setdefault(file_key(fs, path), (r["project"], int(info.get("size") or 0)))
    totals: dict[str, int] = {}
    for project, size in seen.values():
        totals[project] = totals.get(project, 0) + size
    return totals


def push(url: str, *, runs: Sequence[str] | None = None, db: str | Path | None = None) -> HousekeepingReport:
    """Move checkpoints to ``url`` (any fsspec URL), file by file, keeping the index right.

    Files land at ``<url>/<project>/<run_id>/<name>``. Each is copied, checked against its
    recorded sha256, recorded in the index at its new place, and only then deleted locally.
    When every checkpoint of a run has moved, the run's ``checkpoint_root`` becomes
    ``<url>/<project>``, so replay reads from there. Runs still recording or being replayed are
    left alone (``kept``), and so is a run whose files already are at ``url`` under another
    spelling of the same folder (a symlink, ``..``, a relative path): nothing is copied or deleted.

    Example:
        >>> import flor_lightning as flor
        >>> flor.push("s3://bucket/flor")  # doctest: +SKIP

    Raises:
        ConfigError: ``url`` cannot be opened or written, lives only in this process (``memory://``),
            or a run id is unknown.
        CheckpointError: a checkpoint's bytes differ from its recorded sha256 (it is left where it is).
    """
    dst_fs, dst_root = open_fs(url)
    if process_local(dst_fs):
        raise ConfigError(
            f"cannot push to {url!r}: {protocol(dst_fs)}:// keeps files inside this process only, so the "
            "checkpoints would vanish when it exits and no replay could read them. Push to a folder or an "
            "object store other processes can read (/mnt/archive/flor, s3://bucket/flor)."
        )
    report = HousekeepingReport()
    with closing(open_store(db)) as conn:
        rows = store.fetch(conn, "SELECT run_id, project, checkpoint_root FROM runs ORDER BY started, run_id")
        _runs.check_known(conn, runs or ())
        check_writable(dst_fs, dst_root, what="push checkpoints to", hint="Push to a folder or URL you can write.")
        busy = busy_runs(conn)
        for run in rows:
            if runs and run["run_id"] not in runs:
                continue
            if run["run_id"] in busy:
                report.kept[run["run_id"]] = busy[run["run_id"]]
                continue
            if _push_run(conn, run, dst_fs, f"{dst_root}/{run['project']}", report):
                # every checkpoint is there now: replay (and resume) look there first
                new_root = f"{url.rstrip('/')}/{run['project']}"
                store.update(conn, "runs", {"run_id": run["run_id"]}, {"checkpoint_root": new_root})
    return report


def same_file(a_fs: AbstractFileSystem, a: str, b_fs: AbstractFileSystem, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file (or folder).

    Local paths are compared by device and inode, so a symlinked folder, ``..`` or a relative
    spelling is recognised (by where they resolve when one does not exist); other filesystems by
    protocol and normalised path.
    """
    if isinstance(a_fs, LocalFileSystem) and isinstance(b_fs, LocalFileSystem):
        try:
            return os.path.samefile(a, b)
        except OSError:
            return os.path.realpath(a) == os.path.realpath(b)
    return protocol(a_fs) == protocol(b_fs) and posixpath.normpath(a_fs._strip_protocol(a)) == posixpath.normpath(
        b_fs._strip_protocol(b)
    )


def _push_run(
    conn: sqlite3.Connection, run: dict[str, Any], dst_fs: AbstractFileSystem, target: str, report: HousekeepingReport
) -> bool:
    """Move one run's checkpoints under ``target``; whether the index now names every one of them there."""
    run_id = run["run_id"]
    ckpts = store.fetch(conn, "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch, step", [run_id])
    for folder in (run_id, PACKS):  # copies an interrupted push left unfinished
        for partial in dst_fs.glob(f"{target}/{folder}/{TEMPORARY}"):
            dst_fs.rm(partial)
    outcomes = []
    for row in ckpts:
        outcomes.append(_push_file(conn, run, row, dst_fs, target, report))
        if outcomes[-1] == "busy":
            return False
    _remove_pushed_packs(conn, run, ckpts)
    if "elsewhere" in outcomes and "moved" not in outcomes:
        report.kept[run_id] = (
            f"its checkpoints already are there: {target}/{run_id} is the folder they are in under another name "
            f"(a symlink or another spelling of {run['checkpoint_root']}/{run_id}); nothing was copied or deleted"
        )
    return bool(ckpts) and "elsewhere" not in outcomes


def _push_file(
    conn: sqlite3.Connection,
    run: dict[str, Any],
    row: dict[str, Any],
    dst_fs: AbstractFileSystem,
    target: str,
    report: HousekeepingReport,
) -> str:
    """Move one checkpoint; what happened: ``moved``, ``there`` (the index already names the destination),
    ``elsewhere`` (it is the destination file under another name) or ``busy`` (a replay started meanwhile)."""
    run_id = run["run_id"]
    src_fs, src = fs_for(row["path"], run["checkpoint_root"])
    dst = f"{target}/{run_id}/{posixpath.basename(src)}"
    if src_fs.unstrip_protocol(src) == dst_fs.unstrip_protocol(dst) or same_file(src_fs, src, dst_fs, dst):
        _remove_twin(run, posixpath.basename(src), dst_fs, target)  # left by a push killed before its delete
        return "there" if src_fs.unstrip_protocol(src) == dst_fs.unstrip_protocol(dst) else "elsewhere"
    copied = _push_packs(src_fs, src, row, dst_fs, target)  # first: a manifest never lies where its packs do not
    _copy_verified(src_fs, src, dst_fs, dst, row["sha256"])
    with store.immediate(conn):  # no replay can register between this check and the index update
        why = busy_runs(conn).get(run_id)
        if why is None:
            conn.execute(
                "UPDATE checkpoints SET path = ? WHERE run_id = ? AND path = ?",  # one file: epoch-end or inside
                [dst_fs.unstrip_protocol(dst), run_id, row["path"]],
            )
    if why is not None:
        dst_fs.rm(dst)  # the index never named this copy
        report.kept[run_id] = why
        return "busy"
    src_fs.rm(src)
    source, destination = src_fs.unstrip_protocol(src), dst_fs.unstrip_protocol(dst)
    size = row["size"] if row["packs"] is None else int(dst_fs.size(dst)) + copied
    report.moved.append(Moved(run_id, row["epoch"], source, destination, size))
    return "moved"


def _push_packs(
    src_fs: AbstractFileSystem, src: str, row: dict[str, Any], dst_fs: AbstractFileSystem, target: str
) -> int:
    """Copy the packs checkpoint ``row`` references to ``<target>/packs`` unless there already; the bytes copied."""
    copied = 0
    for pack in json.loads(row["packs"] or "[]"):
        source, destination = f"{split(src)[0]}/{pack}", f"{target}/{pack}"
        if dst_fs.exists(destination):  # packs are written whole under their final name, never changed
            continue
        if not src_fs.exists(source):
            raise CheckpointError(
                f"pack {source!r} of checkpoint {src!r} is missing, so the checkpoint was not pushed; replay "
                "re-trains around it, and `flor gc` frees it with its run"
            )
        _copy_verified(src_fs, source, dst_fs, destination, _sha256(src_fs, source))
        copied += int(dst_fs.size(destination))
    return copied


def _remove_pushed_packs(conn: sqlite3.Connection, run: dict[str, Any], ckpts: list[dict[str, Any]]) -> None:
    """Delete the local packs of a pushed run's checkpoints that no checkpoint still indexed there references."""
    root = run["checkpoint_root"]
    if not root or not any(row["packs"] for row in ckpts):
        return
    fs, base = open_fs(root)
    referenced = referenced_packs(conn)
    for pack in {p for row in ckpts for p in json.loads(row["packs"] or "[]")}:
        local = f"{base}/{pack}"
        if file_key(fs, local) not in referenced and fs.exists(local):
            fs.rm(local)


def _remove_twin(run: dict[str, Any], name: str, dst_fs: AbstractFileSystem, target: str) -> None:
    """Delete the local copy left by a push killed after updating the index, before deleting the file."""
    root = run["checkpoint_root"]
    if not root:
        return
    fs, base = open_fs(root)
    twin = f"{base}/{run['run_id']}/{name}"
    if fs.exists(twin) and not same_file(fs, twin, dst_fs, f"{target}/{run['run_id']}/{name}"):
        fs.rm(twin)


def _copy_verified(src_fs: AbstractFileSystem, src: str, dst_fs: AbstractFileSystem, dst: str, sha256: str) -> None:
    """Copy ``src`` to ``dst`` through a temporary name; raise (leaving ``dst`` absent) if a checksum differs."""
    if not src_fs.exists(src):
        raise CheckpointError(
            f"checkpoint {src!r} is missing, so it was not pushed; `flor gc` can drop its index entry, "
            "replay re-trains around it"
        )
    source_hash = hashlib.sha256()
    with atomic(dst_fs, dst) as tmp:  # a failed check below leaves nothing at the destination
        with src_fs.open(src, "rb") as fin, dst_fs.open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                source_hash.update(chunk)
                fout.write(chunk)
        if source_hash.hexdigest() != sha256:
            raise CheckpointError(
                f"checkpoint {src!r} does not match its recorded sha256, so it was not pushed (it stays where it "
                "is); `flor gc` can delete it, replay works around it"
            )
    if _sha256(dst_fs, dst) != sha256:
        dst_fs.rm(dst)
        raise CheckpointError(f"the copy of {src!r} at {dst!r} differs from the original; it was removed, push again")


def _sha256(fs: AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
