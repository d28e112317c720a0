"""Stash housekeeping on real recordings: ``gc`` frees checkpoint space, ``push`` moves checkpoints."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from helpers import git, rows, sha256
from test_cli import MODEL_SOURCE, VAL_CONF, edit_model, flor_cmd, record, replay

import flor_lightning as flor
from flor_lightning import _cli as cli
from flor_lightning import _housekeeping as housekeeping
from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore, snapshot, write_old
from flor_lightning._errors import CheckpointError, ConfigError
from flor_lightning._housekeeping import busy_runs, select_for_gc

pytestmark = pytest.mark.integration


@pytest.fixture
def three_runs(project: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """Three recorded runs of model.py (3 epochs each, a checkpoint per epoch), oldest first."""
    (project / "model.py").write_text(MODEL_SOURCE)
    git(project, "add", "model.py")
    git(project, "commit", "-q", "-m", "model")
    ids = [record(project, monkeypatch, lr=lr) for lr in (0.01, 0.02, 0.03)]
    return project, ids


def index(db: Path, run_id: str) -> list[dict[str, Any]]:
    return rows(db, "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))


def run_dir(run_id: str) -> Path:
    return Path(os.environ["FLOR_HOME"]) / "proj" / run_id


def on_disk(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` (manifests, packs), with its size."""
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def packs_of(db: Path, run_id: str) -> set[Path]:
    """The local pack files the indexed checkpoints of ``run_id`` reference."""
    return {
        Path(c["path"].removeprefix("file://")).parent.parent / p
        for c in index(db, run_id)
        for p in json.loads(c["packs"])
    }


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def add_replay(
    db: Path, run_id: str, *, pid: int | None, segment_status: str = "running", owner: int | None = None
) -> str:
    """The rows replay.py writes for a replay in flight: ``replays`` running, registered by process
    ``owner`` (None: a store older than migration 0004), and, with a pid, a segment."""
    replay_id = f"{run_id}.r{uuid.uuid4().hex[:6]}"
    conn = store.connect(db)
    try:
        row = {"replay_id": replay_id, "run_id": run_id, "started": time.time(), "status": "running"}
        store.insert(conn, "replays", row | {"pid": owner, "host": socket.gethostname()})
        if pid is not None:
            row = {"replay_id": replay_id, "segment": 0, "segments": 1, "rank": 0, "pid": pid}
            row |= {"host": socket.gethostname(), "status": segment_status, "started": time.time()}
            store.insert(conn, "replay_segments", row)
    finally:
        conn.close()
    return replay_id


# ---- gc ---------------------------------------------------------------------------------------------


def test_select_for_gc_keeps_the_latest_per_project_and_busy_runs() -> None:
    runs = [
        {"run_id": "a1", "project": "a", "started": 1.0},
        {"run_id": "a2", "project": "a", "started": 2.0},
        {"run_id": "a3", "project": "a", "started": 3.0},
        {"run_id": "b1", "project": "b", "started": 0.5},
    ]
    collect, kept = select_for_gc(runs, 1, {"a1": "replay x is unfinished"})
    assert collect == ["a2"]
    assert set(kept) == {"a3", "b1", "a1"} and kept["a1"] == "replay x is unfinished"
    assert select_for_gc(runs, 0, {})[0] == ["a3", "a2", "a1", "b1"]


def test_gc_dry_run_then_gc_as_a_process(three_runs: tuple[Path, list[str]]) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    values_before = flor.records()
    proj = run_dir(ids[0]).parent
    before = on_disk(proj)
    assert all(len(index(db, r)) == 4 for r in ids)  # initial state + 3 epochs
    assert sum(c["size"] for r in ids for c in index(db, r)) == sum(before.values())  # each blob stored once
    kept = packs_of(db, ids[2])
    shared = kept & (packs_of(db, ids[0]) | packs_of(db, ids[1]))
    assert shared  # the runs start from the same seeded weights: their initial blobs are one pack

    dry = flor.gc(keep_last=1, dry_run=True)
    assert all(len(index(db, r)) == 4 for r in ids) and on_disk(proj) == before

    done = flor_cmd("gc", "--keep-last", "1", cwd=root)
    assert done.returncode == 0, done.stderr
    after = on_disk(proj)
    freed = sum(before.values()) - sum(after.values())
    assert dry.bytes == freed and f"freed {freed} bytes" in done.stdout
    assert ids[0] in done.stdout and ids[1] in done.stdout and f"kept {ids[2]}" in done.stdout
    for r in ids[:2]:
        assert index(db, r) == [] and not run_dir(r).exists()
    assert len(index(db, ids[2])) == 4
    # what stays is the kept run's manifests and exactly the packs they reference, the shared one included
    assert set(after) == {Path(c["path"]) for c in index(db, ids[2])} | kept
    assert_all_readable(db, ids[2])
    assert flor.records().equals(values_before)  # logged values, runs and code stay
    assert len(flor.runs()) == 3


def test_gc_keeps_runs_an_unfinished_replay_needs(three_runs: tuple[Path, list[str]]) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    gone = dead_pid()
    add_replay(db, ids[0], pid=os.getpid(), owner=gone)  # its segment's process is alive
    add_replay(db, ids[1], pid=None, owner=os.getpid())  # registered, no segment started yet
    add_replay(db, ids[1], pid=None)  # the same in a store older than 0004, which did not name the process
    add_replay(db, ids[2], pid=None, owner=gone)  # killed before any segment began
    report = flor.gc(keep_last=0)
    assert {f.run_id for f in report.freed} == {ids[2]}
    assert "unfinished" in report.kept[ids[0]] and "unfinished" in report.kept[ids[1]]
    for r in ids[:2]:
        assert len(index(db, r)) == 4 and all(Path(c["path"]).exists() for c in index(db, r))
    assert index(db, ids[2]) == []


def test_show_names_a_killed_replay_crashed(
    three_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    dead = add_replay(db, ids[0], pid=dead_pid())
    alive = add_replay(db, ids[0], pid=os.getpid())
    never_began = add_replay(db, ids[0], pid=None, owner=dead_pid())
    starting = add_replay(db, ids[0], pid=None, owner=os.getpid())
    assert cli.main(["show", ids[0], "--format", "json", "--db", str(db)]) == 0
    status = {r["replay_id"]: r["status"] for r in json.loads(capsys.readouterr().out)["replays"]}
    assert status == {dead: "crashed", alive: "running", never_began: "crashed", starting: "running"}


def test_gc_collects_after_a_replay_died_or_finished(three_runs: tuple[Path, list[str]]) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    add_replay(db, ids[0], pid=dead_pid())  # killed: status still running, process gone
    add_replay(db, ids[1], pid=os.getpid(), segment_status="finished")
    assert busy_runs(store.connect(db)) == {}
    report = flor.gc(keep_last=1)
    assert sorted(f.run_id for f in report.freed) == sorted(ids[:2])


def test_gc_keeps_a_run_still_recording(three_runs: tuple[Path, list[str]]) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    conn = store.connect(db)
    store.update(
        conn, "runs", {"run_id": ids[0]}, {"status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    )
    conn.close()
    report = flor.gc(keep_last=0)
    assert report.kept == {ids[0]: "still recording"}
    assert len(index(db, ids[0])) == 4


def test_gc_killed_between_index_and_files_loses_nothing_and_the_next_gc_frees_them(
    three_runs: tuple[Path, list[str]],
) -> None:
    """gc deletes index rows first: the state a kill leaves is orphan files, which the next gc removes."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    manifests = {Path(c["path"]): Path(c["path"]).stat().st_size for c in index(db, ids[0])}
    orphans = packs_of(db, ids[0]) - packs_of(db, ids[1]) - packs_of(db, ids[2])
    orphan_bytes = sum(p.stat().st_size for p in orphans)
    conn = store.connect(db)
    conn.execute("DELETE FROM checkpoints WHERE run_id = ?", [ids[0]])  # what a gc killed midway has done
    conn.close()
    report = flor.gc(keep_last=2)
    # its packs no other run references are swept (no run records there); the shared ones stay (the runs'
    # seeded RNG states and step counters are equal, so the later runs reference the first run's packs too)
    swept = [(housekeeping.UNREFERENCED, len(orphans), orphan_bytes)] if orphans else []
    assert [(f.run_id, f.files, f.bytes) for f in report.freed] == [(ids[0], 4, sum(manifests.values())), *swept]
    assert not run_dir(ids[0]).exists() and not any(p.exists() for p in orphans)
    for r in ids[1:]:
        assert_all_readable(db, r)


def test_gc_sweeps_the_partial_pack_of_a_killed_writer(three_runs: tuple[Path, list[str]]) -> None:
    """A writer killed inside its pack leaves ``<id>.safetensors.tmp-<hex>`` (as large as the checkpoint): gc
    removes it once no run records under the root, and keeps every pack a checkpoint references."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    packs = run_dir(ids[0]).parent / "packs"
    partial = packs / "0123abcd.safetensors.tmp-4567ef"
    partial.write_bytes(b"\0" * 5000)
    report = flor.gc(keep_last=3)
    assert [(f.run_id, f.files, f.bytes) for f in report.freed] == [(housekeeping.UNREFERENCED, 1, 5000)]
    assert not partial.exists()
    for r in ids:
        assert_all_readable(db, r)


def test_gc_rejects_a_negative_keep_last(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="keep_last must be an integer >= 0"):
        flor.gc(keep_last=-1)
    from flor_lightning import _cli as cli

    assert cli.main(["gc", "--keep-last", "-1"]) == 2
    assert "keep_last must be" in capsys.readouterr().err


# ---- push -------------------------------------------------------------------------------------------


def assert_all_readable(db: Path, run_id: str) -> None:
    """Every indexed checkpoint loads (checksum verified), wherever the index says it is."""
    root = rows(db, "SELECT checkpoint_root FROM runs WHERE run_id = ?", (run_id,))[0]["checkpoint_root"]
    ckpts = CheckpointStore(root)
    for c in index(db, run_id):
        assert ckpts.load(c["path"], c["sha256"])  # raises if missing or its sha256 differs


def test_push_to_a_second_local_root_then_replay_reads_from_it(
    three_runs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    remote = tmp_path / "archive"
    before = {r: index(db, r) for r in ids}

    done = flor_cmd("push", str(remote), "--run", ids[0], "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    moved = json.loads(done.stdout)
    assert [m["epoch"] for m in moved] == [-1, 0, 1, 2]
    after = index(db, ids[0])
    for old, new in zip(before[ids[0]], after, strict=True):
        name = Path(old["path"]).name
        assert new["path"] == f"file://{remote}/proj/{ids[0]}/{name}"
        assert new["sha256"] == old["sha256"] and sha256(remote / "proj" / ids[0] / name) == old["sha256"]
        assert not Path(old["path"]).exists()
    assert rows(db, "SELECT checkpoint_root FROM runs WHERE run_id = ?", (ids[0],))[0]["checkpoint_root"] == (
        f"{remote}/proj"
    )
    assert index(db, ids[1]) == before[ids[1]]  # other runs untouched
    assert not list(remote.rglob("*.tmp-*"))

    edit_model(root, *VAL_CONF)
    report = replay(root, ids[0], lr=0.01)
    assert report.epochs_restored == [0, 1, 2] and report.bad_checkpoints == []
    assert report.new_names == ["val_conf"] and report.mismatched == 0 and report.matched > 0


def test_push_every_run_then_again_moves_nothing(three_runs: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    remote = tmp_path / "archive"
    report = flor.push(str(remote))
    assert len(report.moved) == 12 and report.bytes == sum(c["size"] for r in ids for c in index(db, r))
    for r in ids:
        prefix = f"file://{remote}/proj/{r}/"
        assert all(c["path"].startswith(prefix) and Path(c["path"][7:]).exists() for c in index(db, r))
        assert not run_dir(r).exists() or not list(run_dir(r).glob("*.manifest"))
    assert not list(run_dir(ids[0]).parent.rglob("*.safetensors"))  # no local checkpoint needs a pack any more
    assert flor.push(str(remote)).moved == []  # nothing left to move

    edit_model(root, *VAL_CONF)
    rep = replay(root, ids[1], lr=0.02)
    assert rep.epochs_restored == [0, 1, 2] and rep.bad_checkpoints == []
    assert rep.new_names == ["val_conf"] and rep.mismatched == 0


def test_replay_after_a_partial_push_reads_both_places(three_runs: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Half the checkpoints pushed (the third failed its checksum): replay finds every one where the index says."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    run = ids[1]
    third = Path(index(db, run)[2]["path"])
    good = third.read_bytes()
    third.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        flor.push(str(tmp_path / "archive"), runs=[run])
    third.write_bytes(good)
    assert [c["path"].startswith("file://") for c in index(db, run)] == [True, True, False, False]

    edit_model(root, *VAL_CONF)
    rep = replay(root, run, lr=0.02)
    assert rep.epochs_restored == [0, 1, 2] and rep.epochs_trained == [] and rep.bad_checkpoints == []
    assert rep.mismatched == 0 and rep.matched > 0


def test_push_to_another_spelling_of_the_checkpoint_folder_deletes_nothing(
    three_runs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A symlink to FLOR_HOME, FLOR_HOME/../<its name> and a relative path all name the folder the files are in."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    home = Path(os.environ["FLOR_HOME"])
    (tmp_path / "homelink").symlink_to(home, target_is_directory=True)
    before = index(db, ids[0])
    spellings = [str(tmp_path / "homelink"), f"{home}/../{home.name}", os.path.relpath(home, root)]
    for spelling in spellings:
        done = flor_cmd("push", spelling, "--run", ids[0], cwd=root)
        assert done.returncode == 0, done.stderr
        assert f"kept {ids[0]}: its checkpoints already are there" in done.stdout, (spelling, done.stdout)
        assert "nothing was copied or deleted" in done.stdout and "moved 0 bytes" in done.stdout
        assert index(db, ids[0]) == before
        assert all(sha256(Path(c["path"])) == c["sha256"] for c in before)
    assert rows(db, "SELECT checkpoint_root FROM runs WHERE run_id = ?", (ids[0],))[0]["checkpoint_root"] == str(
        home / "proj"
    )

    edit_model(root, *VAL_CONF)
    rep = replay(root, ids[0], lr=0.01)
    assert rep.epochs_restored == [0, 1, 2] and rep.bad_checkpoints == [] and rep.mismatched == 0


def test_push_to_memory_is_refused_and_moves_nothing(
    three_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """memory:// lives inside the pushing process: the files would be gone when it exits."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    before = {r: index(db, r) for r in ids}
    assert cli.main(["push", "memory://x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot push to 'memory://x'" in err and "vanish when it exits" in err
    with pytest.raises(ConfigError, match="keeps files inside this process only"):
        flor.push(f"memory://flor-push-{uuid.uuid4().hex[:8]}")
    assert {r: index(db, r) for r in ids} == before
    assert all(sha256(Path(c["path"])) == c["sha256"] for r in ids for c in before[r])


def test_push_to_a_path_under_a_file_is_a_config_error(
    three_runs: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    before = index(db, ids[0])
    for url in (str(a_file / "archive"), "/proc/flor-archive"):
        assert cli.main(["push", url, "--run", ids[0]]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot push checkpoints to {url!r}" in err, err
    assert index(db, ids[0]) == before and a_file.read_text() == "x"


def test_a_replay_registered_during_a_push_keeps_its_checkpoints(
    three_runs: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The busy check and the index update are one transaction: a replay that registers while the
    first file is copied (after push's first look) keeps every checkpoint where it read them."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    run = ids[0]
    before = index(db, run)
    copy = housekeeping._copy_verified
    registered: list[str] = []

    def copy_then_a_replay_starts(*args: Any) -> None:
        copy(*args)
        if not registered:
            registered.append(add_replay(db, run, pid=None, owner=os.getpid()))

    monkeypatch.setattr(housekeeping, "_copy_verified", copy_then_a_replay_starts)
    report = flor.push(str(tmp_path / "archive"), runs=[run])
    assert report.moved == [] and report.kept == {run: f"replay {registered[0]} is unfinished"}
    assert index(db, run) == before
    assert all(sha256(Path(c["path"])) == c["sha256"] for c in before)
    assert not list((tmp_path / "archive").rglob("*.manifest"))  # the unindexed copy is gone


def test_interrupted_push_leaves_every_checkpoint_readable_and_push_again_finishes(
    three_runs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    remote = tmp_path / "archive"
    run = ids[0]
    # the third file fails its checksum during the copy: push stops there, as if interrupted
    third = Path(index(db, run)[2]["path"])
    good = third.read_bytes()
    third.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        flor.push(str(remote), runs=[run])
    paths = [c["path"] for c in index(db, run)]
    assert [p.startswith("file://") for p in paths] == [True, True, False, False]
    assert not list(remote.rglob("*.tmp-*")) and not (remote / "proj" / run / third.name).exists()
    third.write_bytes(good)
    assert_all_readable(db, run)  # half moved: every checkpoint loads from where the index says

    # killed after the index row moved but before the local file was deleted: the local copy stays behind
    fourth = index(db, run)[3]
    copy = remote / "proj" / run / Path(fourth["path"]).name
    copy.write_bytes(Path(fourth["path"]).read_bytes())
    for pack in json.loads(fourth["packs"]):  # its packs went first
        (remote / "proj" / pack).write_bytes((run_dir(run).parent / pack).read_bytes())
    conn = store.connect(db)
    store.update(conn, "checkpoints", {"run_id": run, "epoch": fourth["epoch"]}, {"path": f"file://{copy}"})
    conn.close()
    assert_all_readable(db, run)

    report = flor.push(str(remote), runs=[run])
    assert [m.epoch for m in report.moved] == [1]  # the one left; the twin of epoch 2 is cleaned up
    assert not list(run_dir(run).glob("*.manifest"))
    assert_all_readable(db, run)


def test_push_unknown_run_and_bad_url(three_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    from flor_lightning import _cli as cli

    assert cli.main(["push", str(three_runs[0].parent / "archive"), "--run", "nope"]) == 1
    assert "unknown run id 'nope'; the latest runs are [" in capsys.readouterr().err
    assert cli.main(["push", "nosuchproto://bucket/x"]) == 2
    assert "cannot use checkpoint location" in capsys.readouterr().err


KILLER = """
import os, signal, sys
from fsspec.implementations.local import LocalFileSystem
from flor_lightning import _housekeeping as housekeeping, _store as store

point, n, url, run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
calls = 0

def killing(original):
    def wrapped(*args, **kwargs):
        global calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped

if point == "before-rename":
    LocalFileSystem.mv = killing(LocalFileSystem.mv)
elif point == "before-index":
    store.immediate = killing(store.immediate)
else:
    LocalFileSystem.rm = killing(LocalFileSystem.rm)
if url == "gc":
    housekeeping.gc(keep_last=int(run))
else:
    housekeeping.push(url, runs=[run])
"""

KILL_POINTS = ("before-rename", "before-index", "before-delete")
SPELLINGS = ("plain", "symlink", "dotdot", "relative")
PUSH_TRIALS = 10


def spelled(folder: Path, how: str, links: Path) -> str:
    """``folder`` as a user might type it: plainly, through a symlink, with ``..``, or relative to the project."""
    if how == "symlink":
        link = links / f"{folder.name}-link"
        if not link.is_symlink():
            link.symlink_to(folder, target_is_directory=True)
        return str(link)
    if how == "dotdot":
        return f"{folder}/../{folder.name}"
    if how == "relative":
        return os.path.relpath(folder, Path.cwd())
    return str(folder)


def check_index(db: Path, recorded: dict[tuple[str, int], str]) -> None:
    """The store's invariants: it opens whole, and every checkpoint it ever indexed still is, complete."""
    conn = store.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    now = {(r, c["epoch"]): c["sha256"] for r in {run for run, _ in recorded} for c in index(db, r)}
    assert now == recorded
    for run in {run for run, _ in recorded}:
        assert_all_readable(db, run)


def check_only_in(db: Path, run: str, folder: Path, other: Path) -> None:
    """Every checkpoint of ``run`` lies in ``folder`` (however the index spells it), once: no copy is left
    in ``other`` and no unfinished temporary file anywhere."""
    here = folder / "proj" / run
    for c in index(db, run):
        path = c["path"].removeprefix("file://")
        assert os.path.samefile(os.path.dirname(path), here), (c["path"], here)
    assert not list((other / "proj" / run).glob("*.manifest"))
    assert not list(folder.rglob("*.tmp-*")) and not list(other.rglob("*.tmp-*"))


def test_push_and_gc_killed_at_random_lose_no_checkpoint(three_runs: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Property: whichever step a real SIGKILL hits (a copy's rename, an index update, a delete; the n-th of
    them), pushing between two folders, each named plainly, through a symlink, with ``..`` or relative to
    the project, every indexed checkpoint stays complete and readable, and the same push run again leaves
    each file in the destination once. Then gc, killed at a random delete, loses nothing it keeps."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    folders = (Path(os.environ["FLOR_HOME"]), tmp_path / "archive")
    recorded = {(r, c["epoch"]): c["sha256"] for r in ids for c in index(db, r)}
    rng = random.Random(20261202)
    kills = Counter[str]()
    for _ in range(PUSH_TRIALS):
        run, to, how = rng.choice(ids), rng.randrange(2), rng.choice(SPELLINGS)
        point, n = rng.choice(KILL_POINTS), rng.randint(1, 4)
        url = spelled(folders[to], how, tmp_path)
        done = subprocess.run([sys.executable, "-c", KILLER, point, str(n), url, run], cwd=root, capture_output=True)
        assert done.returncode in (0, -9), done.stderr
        kills[f"{point} {'killed' if done.returncode else 'not reached'}"] += 1
        check_index(db, recorded)

        flor.push(url, runs=[run])  # again, to the same place: it finishes the move
        check_index(db, recorded)
        check_only_in(db, run, folders[to], folders[1 - to])
    print(dict(kills))
    assert sum(n for k, n in kills.items() if k.endswith("killed")) >= PUSH_TRIALS // 2, kills

    newest = ids[2]  # gc --keep-last 1 keeps the most recent run
    done = subprocess.run(
        [sys.executable, "-c", KILLER, "before-delete", str(rng.randint(1, 6)), "gc", "1"],
        cwd=root,
        capture_output=True,
    )
    assert done.returncode in (0, -9), done.stderr
    assert index(db, ids[0]) == index(db, ids[1]) == []  # the index rows went first, in one transaction
    check_index(db, {k: v for k, v in recorded.items() if k[0] == newest})
    flor.gc(keep_last=1)
    for r in ids[:2]:
        assert not [p for f in folders for p in (f / "proj" / r).rglob("*") if p.is_file()], r
    check_index(db, {k: v for k, v in recorded.items() if k[0] == newest})


def test_gc_killed_with_sigkill_between_files_loses_nothing(three_runs: tuple[Path, list[str]]) -> None:
    """A real SIGKILL at gc's second file deletion: the kept run is intact, the next gc frees the rest."""
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    proj = run_dir(ids[0]).parent
    before = on_disk(proj)
    first_file = Path(index(db, ids[0])[0]["path"]).stat().st_size  # gc deletes the initial state's manifest first
    done = subprocess.run(
        [sys.executable, "-c", KILLER, "before-delete", "2", "gc", "1"], cwd=root, capture_output=True
    )
    assert done.returncode == -9, done.stderr
    assert index(db, ids[0]) == index(db, ids[1]) == []  # index rows went first, in one transaction
    assert len(index(db, ids[2])) == 4
    assert_all_readable(db, ids[2])
    report = flor.gc(keep_last=1)
    after = on_disk(proj)
    assert report.bytes == sum(before.values()) - sum(after.values()) - first_file  # what the kill left, no more
    assert not run_dir(ids[0]).exists() and not run_dir(ids[1]).exists()
    assert set(after) == {Path(c["path"]) for c in index(db, ids[2])} | packs_of(db, ids[2])


# ---- runs recorded before manifests ------------------------------------------------------------------


def make_old(db: Path, run_id: str) -> None:
    """Turn ``run_id``'s checkpoints into what the recorder wrote before manifests and blobs: one torch.save
    ``.ckpt`` file each, its sha256 and size in the index, no format and no packs (as before migration 0009)."""
    conn = store.connect(db)
    try:
        for c in index(db, run_id):
            manifest = Path(c["path"])
            state = CheckpointStore(str(manifest)).load(c["path"], c["sha256"])
            path = manifest.with_suffix(".ckpt")
            digest, size = write_old(LocalFileSystem(), str(path), snapshot(state))
            values = {"path": str(path), "sha256": digest, "size": size, "format": None, "packs": None}
            store.update(conn, "checkpoints", {"run_id": run_id, "epoch": c["epoch"]}, values)
            manifest.unlink()
        referenced = housekeeping.referenced_packs(conn)
    finally:
        conn.close()
    for pack in (run_dir(run_id).parent / "packs").iterdir():
        if os.path.realpath(pack) not in referenced:
            pack.unlink()


def test_a_run_recorded_before_manifests_replays_pushes_and_is_collected(
    three_runs: tuple[Path, list[str]], tmp_path: Path
) -> None:
    root, ids = three_runs
    db = root / ".flor" / "flor.db"
    make_old(db, ids[0])
    old = index(db, ids[0])
    assert [Path(c["path"]).name for c in old] == [
        f"{n}.ckpt" for n in ("initial", *(f"epoch={e:05d}" for e in range(3)))
    ]
    assert all(c["format"] is None and sha256(Path(c["path"])) == c["sha256"] for c in old)
    for r in ids:
        assert_all_readable(db, r)  # the new runs lost no pack they share with the converted one

    edit_model(root, *VAL_CONF)
    report = replay(root, ids[0], lr=0.01)
    assert report.epochs_restored == [0, 1, 2] and report.bad_checkpoints == []
    assert report.new_names == ["val_conf"] and report.mismatched == 0 and report.matched > 0

    remote = tmp_path / "archive"
    pushed = flor.push(str(remote), runs=[ids[0]])
    assert [(m.epoch, m.bytes) for m in pushed.moved] == [(c["epoch"], c["size"]) for c in old]
    assert all(sha256(remote / "proj" / ids[0] / Path(c["path"]).name) == c["sha256"] for c in old)
    assert not list(run_dir(ids[0]).glob("*.ckpt"))
    assert replay(root, ids[0], lr=0.01).epochs_restored == [0, 1, 2]

    freed = flor.gc(keep_last=2)
    assert [(f.run_id, f.files, f.bytes) for f in freed.freed] == [(ids[0], 4, sum(c["size"] for c in old))]
    assert not (remote / "proj" / ids[0]).exists() and index(db, ids[0]) == []
    for r in ids[1:]:
        assert_all_readable(db, r)
