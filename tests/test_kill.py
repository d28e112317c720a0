"""Recording processes killed with SIGKILL at random moments lose nothing they had made durable.

Each kill hits a real child process recording a model with a 13 MB training state and 50
values per step (see workers.py). Kills are aimed with a seeded random generator: some a
random time after the child starts (its start-up and code snapshot included), some a random
time into a checkpoint write, some a few milliseconds into a log flush. The child reports
each write as it begins and once it is durable, so after each kill the test knows what the
store must hold, and where the kill landed. The killed runs share one checkpoint root, so
their checkpoints share blobs (the seeded initial state is the same): after every kill, every
manifest under the root, indexed or not, still loads with each blob verified.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from helpers import git, rows, sha256, user_git_state
from zygote import Child, Zygote

import flor_lightning as flor
from flor_lightning import _store as store
from flor_lightning._blobs import FORMAT, MANIFEST_SUFFIX
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._shadow import SHADOW_BRANCH

pytestmark = pytest.mark.integration

KILLS = 24
SEED = 20261128
SCRIPT = """\
# What each killed child runs (the tests fork it from a server that has imported torch already).
from workers import record_until_killed

record_until_killed(flush_interval=0.5, train_batches=10)
"""


def aim(zygote: Zygote, child: Child, mode: str, rng: random.Random) -> None:
    """Return at the moment ``child`` is to be killed."""
    started = len(child.events)
    if mode == "anytime":  # start-up, code snapshot, training, writes: whatever runs then
        zygote.wait_event(child, lambda e: False, timeout=rng.uniform(0.0, 1.5))
        return
    if mode == "checkpoint":  # a random time into the write of checkpoint -1, 0 or 1
        epoch = rng.choice([-1, 0, 1])
        hit = zygote.wait_event(child, lambda e: e == f"ckpt-begin {epoch}", timeout=30, start=started)
        delay = rng.uniform(0.0, 0.02)  # blob writes of this small state take a few tens of ms
    else:  # a few milliseconds into a log flush of at least 200 values (a few ms of sqlite work)
        hit = zygote.wait_event(child, big_flush, timeout=30, start=started)
        delay = rng.uniform(0.0, 0.004)
    assert hit is not None, f"the child never reached its {mode} moment:\n{child.log_tail()}"
    zygote.wait_event(child, lambda e: False, timeout=delay)


def big_flush(event: str) -> bool:
    return event.startswith("flush-begin") and int(event.split()[2]) >= 200


def in_flight(events: list[str], begin: str, end: str) -> str | None:
    """The last ``begin`` event when no ``end`` followed it (the write the kill interrupted)."""
    mine = [e for e in events if e.startswith((begin, end))]
    return mine[-1] if mine and mine[-1].startswith(begin) else None


def check_logs(db: Path, run_id: str, events: list[str]) -> None:
    """Every value reported flushed is stored; an interrupted flush is stored whole or not at all."""
    stored = rows(db, "SELECT count(*) AS n FROM logs WHERE run_id = ?", (run_id,))[0]["n"]
    flushes = [e.split() for e in events if e.startswith(("flush-begin", "flushed"))]
    if not flushes:
        assert stored == 0
    elif flushes[-1][0] == "flushed":
        assert stored == int(flushes[-1][1])
    else:
        before, pending = int(flushes[-1][1]), int(flushes[-1][2])
        assert stored == before or stored >= before + pending, (stored, before, pending)


def partial_packs(root: Path) -> set[Path]:
    """The temporary files of pack writes that never finished, under the root shared by the runs."""
    return set((root / "packs").glob("*.tmp-*"))


def check_checkpoints(db: Path, folder: Path, run_id: str, events: list[str], stale_packs: set[Path]) -> None:
    """Each indexed checkpoint is complete; only the write the kill interrupted left anything else (beside the
    ``stale_packs`` earlier kills left); no manifest anywhere under the root names a blob that is missing or
    damaged."""
    done = {int(e.split()[1]) for e in events if e.startswith("ckpt-end")}
    cut = in_flight(events, "ckpt-begin", "ckpt-end")
    cut_epoch = int(cut.split()[1]) if cut else None
    indexed = rows(db, "SELECT * FROM checkpoints WHERE run_id = ? ORDER BY epoch", (run_id,))
    assert done <= {r["epoch"] for r in indexed} <= done | {cut_epoch}
    timed = {r["epoch"] for r in rows(db, "SELECT epoch FROM epochs WHERE run_id = ?", (run_id,))}
    reader = CheckpointStore(str(folder.parent))
    for r in indexed:
        path = Path(r["path"])
        assert path.parent == folder and ".tmp-" not in path.name
        assert sha256(path) == r["sha256"] and r["format"] == FORMAT
        assert all((folder.parent / p).is_file() for p in json.loads(r["packs"]))
        assert r["epoch"] < 0 or r["epoch"] in timed  # the epoch's row is written before its checkpoint
    if indexed:
        assert reader.load(indexed[-1]["path"], indexed[-1]["sha256"])["flor"]["run_id"] == run_id

    files = [p for p in folder.iterdir() if not p.name.startswith(".probe-")] if folder.exists() else []
    cut_path = Path(reader.path(run_id, cut_epoch)) if cut_epoch is not None else None
    partial = [p for p in files if ".tmp-" in p.name]
    assert all(p.name.startswith(f"{cut_path.name}.tmp-") for p in partial) if cut_path else not partial
    assert len(partial) <= 1
    # renamed into place but not yet indexed: only the interrupted write, and then it is whole
    unindexed = {p for p in files if ".tmp-" not in p.name} - {Path(r["path"]) for r in indexed}
    assert unindexed <= ({cut_path} if cut_path else set())
    for path in unindexed:
        assert reader.load(str(path), None)["flor"]["epoch"] == cut_epoch
    # packs are shared by the runs under the root: a killed write leaves at most its unfinished pack behind
    assert len(partial_packs(folder.parent) - stale_packs) <= (1 if cut_path else 0)


def check_every_manifest_loads(root: Path) -> None:
    """Every manifest under the root, indexed or not, of any killed run: each blob it names is there, verified."""
    reader = CheckpointStore(str(root))
    for manifest in root.glob(f"*/*{MANIFEST_SUFFIX}"):
        assert reader.load(str(manifest), None)["flor"]["run_id"] == manifest.parent.name


def check_git(project: Path, shadow_commits: list[str]) -> None:
    git(project, "rev-parse", "--verify", f"{SHADOW_BRANCH}^{{commit}}")
    fsck = subprocess.run(
        ["git", "fsck", "--no-progress", "--no-dangling"], cwd=project, capture_output=True, text=True
    )
    assert fsck.returncode == 0 and "error" not in fsck.stderr.lower(), fsck.stderr
    for commit in shadow_commits:
        git(project, "merge-base", "--is-ancestor", commit, SHADOW_BRANCH)  # raises when it is not on the branch


def test_sigkill_at_random_moments_loses_nothing_made_durable(
    project: Path, flor_home: Path, zygote: Zygote, tmp_path: Path
) -> None:
    (project / "record.py").write_text(SCRIPT)
    db = project / ".flor" / "flor.db"
    user_before = user_git_state(project)
    rng = random.Random(SEED)
    landed: Counter[str] = Counter()
    modes = ["checkpoint", "flush", "anytime"]
    for i in range(KILLS):
        mode = modes[i % len(modes)]
        stale_packs = partial_packs(flor_home / "proj")
        child = zygote.fork(
            "record_until_killed",
            cwd=project,
            argv=[str(project / "record.py")],
            log=tmp_path / f"child-{i}.log",
            flush_interval=0.5,
            train_batches=10,
        )
        aim(zygote, child, mode, rng)
        ended = zygote.kill(child)
        assert ended.signal == 9, f"kill {i} ({mode}): the child ended on its own ({ended}):\n{child.log_tail()}"
        events = list(child.events)
        landed[mode] += 1
        landed["during a checkpoint write"] += in_flight(events, "ckpt-begin", "ckpt-end") is not None
        landed["during a log flush"] += in_flight(events, "flush-begin", "flushed") is not None
        landed["before the run was open"] += not any(e.startswith("run ") for e in events)

        conn = store.connect(db)  # opens without repair
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        runs = flor.runs()
        assert set(runs["status"]) == {"crashed"}, runs[["run_id", "status"]]
        opened = [e.split()[1] for e in events if e.startswith("run ")]
        for run_id in opened:
            assert run_id in set(runs["run_id"])
            check_logs(db, run_id, events)
            check_checkpoints(db, flor_home / "proj" / run_id, run_id, events, stale_packs)
        check_every_manifest_loads(flor_home / "proj")
        check_git(project, [c for c in runs["shadow_commit"] if c])

    print(dict(landed))
    assert landed["during a checkpoint write"] >= 4, landed
    assert landed["during a log flush"] >= 3, landed
    runs = flor.runs()
    assert len(runs) >= KILLS - landed["before the run was open"]
    assert set(runs["script"]) == {"record.py"}
    assert git(project, "show", f"{runs['shadow_commit'].iloc[-1]}:record.py") == SCRIPT.rstrip("\n")
    assert user_git_state(project) == user_before  # the user's HEAD, branch, index and files
    table = flor.query("train_loss", "m49")
    assert set(table["run_id"]) <= set(runs["run_id"]) and len(table) > 0
