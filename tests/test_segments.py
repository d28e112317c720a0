"""Replay segments on several ranks (DDP over gloo on the CPU) and dispatched by hand; their records.

The integration tests run real processes: Lightning's ``ddp`` strategy re-launches the script for
rank 1, ``ddp_fork`` forks both ranks from the script's process inside fit, so the replays run as
scripts in a subprocess, as a user's would. The others read and write a real sqlite file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import lightning as L
import pytest
from helpers import git, rows
from models import DigitsClassifier, trainer_kwargs

import flor_lightning as flor
from flor_lightning import _cli as cli
from flor_lightning import _segments
from flor_lightning import _store as store
from flor_lightning._errors import ReplayError

SCRIPT = '''
import json, os, sys
import lightning as L
import torch
import flor_lightning as flor
from model import DigitsClassifier, DigitsData, trainer_kwargs

class WithBatchNorm(DigitsClassifier):
    """BatchNorm buffers: rank 0's must never be broadcast into rank 1 during replay."""
    def __init__(self):
        super().__init__()
        self.net.insert(1, torch.nn.BatchNorm1d(32))

mode, devices, segments = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
segment = int(sys.argv[4]) if len(sys.argv) > 4 else None
L.seed_everything(7)
kw = trainer_kwargs(max_epochs=int(os.environ.get("EPOCHS", "4")), **json.loads(os.environ.get("TRAINER", "{}")))
if devices > 1:
    kw.update(devices=devices, strategy=os.environ.get("STRATEGY", "ddp"))
if os.environ.get("NUM_NODES"):  # this process is one node: NODE_RANK, MASTER_ADDR and MASTER_PORT say which
    kw.update(num_nodes=int(os.environ["NUM_NODES"]), devices=1, strategy="ddp")
trainer = flor.Trainer(**kw)
model = WithBatchNorm() if os.environ.get("BATCHNORM") else DigitsClassifier()
if mode == "record":
    trainer.fit(model, datamodule=DigitsData())
    print("RUN", trainer.flor.run_id)
else:
    report = trainer.replay(model, datamodule=DigitsData(), segments=segments, segment=segment)
    if trainer.global_rank == 0:
        print("REPORT", json.dumps(report.__dict__), flush=True)
'''

VAL_METRIC = (
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())',
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())\n'
    '        self.log(f"{prefix}_conf", logits.softmax(1).max(1).values.mean(), sync_dist=True)\n'
    '        if __import__("os").environ.get("FAIL_RANK") == str(self.global_rank) and self.current_epoch >= 2:\n'
    '            raise RuntimeError("rank failure injected by the test")\n'
    '        if __import__("os").environ.get("STALL_RANK") == str(self.global_rank) and self.current_epoch >= 2:\n'
    '            __import__("time").sleep(300)  # until the test kills it',
)
TRAIN_METRIC = (
    'self.log("train_loss", loss, on_step=True, on_epoch=True)',
    'self.log("train_loss", loss, on_step=True, on_epoch=True)\n'
    '        self.log("train_x2", loss.detach() * 2, sync_dist=True, on_epoch=True)',
)


@pytest.fixture
def script(project: Path) -> Path:
    model = (Path(__file__).parent / "models.py").read_text()
    (project / "model.py").write_text(model)
    (project / "replay_me.py").write_text(SCRIPT)
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "model and script")
    return project


def run(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "replay_me.py", *args],
        cwd=root,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"replay_me.py {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.returncode, proc.stdout + proc.stderr


def report_of(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


def edit(root: Path, old: str, new: str) -> None:
    path = root / "model.py"
    path.write_text(path.read_text().replace(old, new))


def replayed(replay_id: str) -> list[tuple]:
    """The replay's values, without its id, in a canonical order."""
    df = flor.records()
    df = df[df["replay_id"] == replay_id].drop(columns="replay_id")
    return sorted(map(tuple, df.astype(str).to_numpy()))


STRATEGIES = pytest.mark.parametrize("strategy", ["ddp", "ddp_fork"])


@pytest.mark.integration
@STRATEGIES
def test_two_ranks_give_what_one_segment_gives_for_a_validation_metric(script, strategy):
    run(script, "record", "1", "1")
    edit(script, *VAL_METRIC)
    one = report_of(run(script, "replay", "1", "1")[1])
    two = report_of(run(script, "replay", "2", "2", env={"STRATEGY": strategy})[1])
    assert two["epochs_restored"] == [0, 1, 2, 3] and two["mismatched"] == 0
    assert two["matched"] == two["rederived"] == one["rederived"] > 0
    # full validation set on each rank, no averaging across ranks, each value stored once
    assert replayed(two["replay_id"]) == replayed(one["replay_id"])
    seg_rows = rows(
        script / ".flor" / "flor.db",
        "SELECT segment, rank, status FROM replay_segments WHERE replay_id = ? ORDER BY segment",
        (two["replay_id"],),
    )
    assert [(r["segment"], r["rank"], r["status"]) for r in seg_rows] == [(0, 0, "finished"), (1, 1, "finished")]


@pytest.mark.integration
@STRATEGIES
def test_re_training_on_two_ranks_with_unequal_segments_and_batchnorm_is_exact(script, strategy):
    env = {"EPOCHS": "3", "BATCHNORM": "1"}
    run(script, "record", "1", "1", env=env)
    edit(script, *TRAIN_METRIC)
    one = report_of(run(script, "replay", "1", "1", env=env)[1])
    two = report_of(run(script, "replay", "2", "2", env=env | {"STRATEGY": strategy})[1])  # 2 and 1 epochs
    assert two["epochs_trained"] == [0, 1, 2] and one["epochs_trained"] == [0, 1, 2]
    assert two["mismatched"] == 0 and two["matched"] == two["rederived"] == one["rederived"] > 0
    assert replayed(two["replay_id"]) == replayed(one["replay_id"])


@pytest.mark.integration
def test_manual_segments_in_separate_processes_equal_one_replay(script):
    run(script, "record", "1", "1")
    edit(script, *VAL_METRIC)
    one = report_of(run(script, "replay", "1", "1")[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "replay_me.py", "replay", "1", "2", str(i)],
            cwd=script,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (1, 0)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    parts = [report_of(o) for o in outputs]
    assert sorted(e for p in parts for e in p["epochs_restored"]) == [0, 1, 2, 3]
    union = sorted(v for p in parts for v in replayed(p["replay_id"]))
    assert union == replayed(one["replay_id"])


@pytest.mark.integration
@STRATEGIES
def test_a_failed_rank_fails_the_replay_and_names_its_segment(script, strategy):
    run(script, "record", "1", "1")
    edit(script, *VAL_METRIC)
    code, output = run(script, "replay", "2", "2", env={"FAIL_RANK": "1", "STRATEGY": strategy}, check=False)
    assert code != 0
    assert "segment 1 (rank 1): RuntimeError: rank failure injected by the test" in output
    assert "segment=<i>" in output  # says how to re-run it alone
    [replay] = rows(script / ".flor" / "flor.db", "SELECT replay_id, status FROM replays")
    segs = rows(script / ".flor" / "flor.db", "SELECT segment, status FROM replay_segments ORDER BY segment")
    assert replay["status"] == "failed" and segs[1]["status"] == "failed", segs


@pytest.mark.integration
def test_segment_arguments_must_fit_the_world_size(project):
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(devices=2, strategy="ddp"))
    with pytest.raises(ReplayError, match="pass segments=2"):
        trainer.replay(DigitsClassifier(), segments=3)
    with pytest.raises(ReplayError, match=r"use segments=2 .* or devices=1 with segment=i"):
        trainer.replay(DigitsClassifier(), segments=2, segment=0)


@pytest.mark.integration
def test_spawning_strategies_are_refused_with_what_to_use(project):
    trainer = flor.Trainer(**trainer_kwargs(devices=2, strategy="ddp_spawn"))
    with pytest.raises(ReplayError, match="strategy='ddp'"):
        trainer.replay(DigitsClassifier(), segments=2)


# ---- two nodes, each with its own log store and working copy --------------------------------------


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nodes(
    node0: Path, node1: Path, tmp_path: Path, env: dict[str, str], env1: dict[str, str], wrap1: tuple[str, ...] = ()
) -> list[subprocess.Popen[str]]:
    """Replay in two segments as two nodes of one process each, launched as a cluster launches them: node 0
    in the project (its store holds the run), node 1 in another working copy with a store of its own; both
    read the checkpoints from the one FLOR_HOME."""
    common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NUM_NODES": "2", **env}
    envs = [
        {**common, "NODE_RANK": "0", "FLOR_DB": str(node0 / ".flor" / "flor.db")},
        {**common, "NODE_RANK": "1", "FLOR_DB": str(tmp_path / "node1-store" / "flor.db"), **env1},
    ]
    return [
        subprocess.Popen(
            [*wrap, sys.executable, "replay_me.py", "replay", "1", "2"],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for root, env, wrap in zip((node0, node1), envs, ((), wrap1), strict=True)
    ]


def two_nodes(node0: Path, node1: Path, tmp_path: Path, env1: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """:func:`start_nodes`, each node's exit status and output once both ended."""
    procs = start_nodes(node0, node1, tmp_path, {}, env1 or {})
    return [(p.wait(timeout=300), p.communicate()[0]) for p in procs]


def node_copy(script: Path, tmp_path: Path) -> Path:
    """Node 1's working copy: a clone of the project with the same uncommitted edit."""
    other = tmp_path / "node1"
    git(tmp_path, "clone", "-q", str(script), str(other))
    (other / "model.py").write_text((script / "model.py").read_text())
    return other


@pytest.mark.integration
def test_two_nodes_with_stores_of_their_own_merge_into_what_one_process_replays(script, tmp_path, capsys):
    run(script, "record", "1", "1")
    edit(script, *VAL_METRIC)
    one = report_of(run(script, "replay", "1", "1")[1])
    (code0, out0), (code1, out1) = two_nodes(script, node_copy(script, tmp_path), tmp_path)

    assert code0 == 0 and code1 == 0, out0[-3000:] + out1[-3000:]
    two = report_of(out0)
    assert two["epochs_restored"] == [0, 1, 2, 3] and two["mismatched"] == 0
    assert two["matched"] == two["rederived"] == one["rederived"] > 0
    assert replayed(two["replay_id"]) == replayed(one["replay_id"])  # node 1's values merged, bit for bit
    db = script / ".flor" / "flor.db"
    segs = rows(db, "SELECT segment, rank, status FROM replay_segments WHERE replay_id = ?", (two["replay_id"],))
    assert sorted((r["segment"], r["rank"], r["status"]) for r in segs) == [(0, 0, "finished"), (1, 1, "finished")]
    node_store = tmp_path / "node1-store" / "replays" / two["replay_id"] / "node-1.rank-1.sqlite"
    assert rows(node_store, "SELECT count(*) AS n FROM logs")[0]["n"] > 0  # node 1 kept its own copy
    count = "SELECT count(*) AS n FROM logs WHERE replay_id = ?"
    before = rows(db, count, (two["replay_id"],))[0]["n"]

    assert cli.main(["merge", two["replay_id"]]) == 0  # by hand, after the replay merged it
    assert rows(db, count, (two["replay_id"],))[0]["n"] == before  # nothing added twice
    assert "0 rows added" in capsys.readouterr().out


@pytest.mark.integration
def test_a_failed_node_fails_the_replay_and_is_named_with_the_command_that_re_runs_it(script, tmp_path):
    run_id = run(script, "record", "1", "1")[1].split("RUN ")[1].split()[0]
    edit(script, *VAL_METRIC)
    (code0, out0), (code1, _) = two_nodes(script, node_copy(script, tmp_path), tmp_path, env1={"FAIL_RANK": "1"})

    assert code0 != 0 and code1 != 0
    assert "segment 1 (rank 1, node 1): RuntimeError: rank failure injected by the test" in out0, out0[-3000:]
    assert f"trainer.replay(..., run={run_id!r}, segment=<i>, segments=2)" in out0
    assert "for i in [1]" in out0
    db = script / ".flor" / "flor.db"
    [replay] = rows(db, "SELECT replay_id, status FROM replays WHERE replay_id != ''")
    assert replay["status"] == "failed"
    kept = rows(db, "SELECT DISTINCT epoch FROM logs WHERE replay_id = ? AND name = 'val_conf'", (replay["replay_id"],))
    segs = rows(
        db, "SELECT segment, epochs FROM replay_segments WHERE replay_id = ? ORDER BY segment", (replay["replay_id"],)
    )
    first, second = (json.loads(r["epochs"]) for r in segs)  # split by the recorded epoch times
    failed_in = max(2, second[0])  # the model raises in the first validation of an epoch >= 2
    # node 0's segment, and node 1's values up to its failure
    assert [r["epoch"] for r in kept] == [*first, *(e for e in second if e <= failed_in)]


@pytest.mark.integration
def test_a_node_killed_in_its_segment_is_named_once_its_heartbeat_stops(script, tmp_path):
    run_id = run(script, "record", "1", "1")[1].split("RUN ")[1].split()[0]
    edit(script, *VAL_METRIC)
    beat = {"FLOR_HEARTBEAT_S": "0.2"}  # on both nodes: node 0 takes 12 missed beats (2.4 s) for death
    node0, node1 = start_nodes(script, node_copy(script, tmp_path), tmp_path, beat, {"STALL_RANK": "1"})
    deadline = time.monotonic() + 240
    status: list[Path] = []
    while not status and time.monotonic() < deadline and node1.poll() is None:
        status = list(tmp_path.glob("flor-home/*/*/replays/*/node-1.rank-1.json"))
        time.sleep(0.1)
    assert status, node1.communicate()[0][-3000:]
    time.sleep(1.0)  # beats have been heard
    node1.send_signal(signal.SIGKILL)
    node1.wait(timeout=60)
    out0 = node0.communicate(timeout=300)[0]

    assert node0.returncode != 0
    died = "segment 1 (rank 1, node 1): node 1 sent no heartbeat for 2s: its process or the node died"
    assert died in out0, out0[-3000:]
    assert f"trainer.replay(..., run={run_id!r}, segment=<i>, segments=2)" in out0 and "for i in [1]" in out0
    assert "node-1.rank-1.sqlite)" in out0  # where node 1's values so far are


def _can_unshare() -> bool:
    done = subprocess.run(["unshare", "--mount", "true"], capture_output=True)  # needs CAP_SYS_ADMIN (root)
    return done.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux" or not _can_unshare(), reason="needs `unshare --mount` (root on Linux)")
def test_a_node_that_cannot_read_the_checkpoints_stops_every_rank_with_where_they_must_be(script, tmp_path):
    run(script, "record", "1", "1")
    edit(script, *VAL_METRIC)
    home = tmp_path / "flor-home"
    # node 1 sees its own, empty FLOR_HOME folder, as a node that does not share the launching node's disk
    hide = ("unshare", "--mount", "sh", "-c", f'mount -t tmpfs none {home} && exec "$@"', "node1")
    procs = start_nodes(script, node_copy(script, tmp_path), tmp_path, {}, {}, wrap1=hide)
    (code0, out0), (code1, out1) = [(p.wait(timeout=300), p.communicate()[0]) for p in procs]

    assert code0 != 0 and code1 != 0
    assert "a rank on another node cannot read the checkpoints of run" in out0, out0[-3000:]
    assert "put them where every node reads them (shared storage, or FlorCallback(checkpoint_dir=" in out0
    assert "node 1 cannot (" in out1 and "is not there)" in out1, out1[-3000:]


# ---- the launching rank waits for the others as long as they live ------------------------------


class _Clock:
    """A clock that each sleep moves on by 1000 s, and calls ``at[n]`` on the n-th sleep."""

    def __init__(self, at: dict[int, object]) -> None:
        self.now, self.sleeps, self.at = 0.0, 0, at

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += 1000.0
        self.sleeps += 1
        action = self.at.get(self.sleeps)
        if callable(action):
            action()


def _segment_rows(db: Path, statuses: dict[int, str]) -> None:
    with closing(store.connect(db)) as c:
        for segment, status in statuses.items():
            store.insert(
                c,
                "replay_segments",
                {
                    "replay_id": "r",
                    "segment": segment,
                    "segments": 3,
                    "rank": segment,
                    "pid": os.getpid(),  # alive
                    "host": socket.gethostname(),
                    "status": status,
                    "epochs": [segment],
                    "started": 0.0,
                },
            )


def test_segments_still_running_past_the_start_timeout_are_waited_for(tmp_path):
    db = tmp_path / "flor.db"
    _segment_rows(db, {0: "finished", 1: "running", 2: "running"})
    clock = _Clock({5: lambda: _segment_rows(db, {0: "finished", 1: "finished", 2: "finished"})})

    _segments.wait_for_segments(str(db), "r", 3, start_timeout=10.0, clock=clock, sleep=clock.sleep)

    assert clock.sleeps == 5 and clock.now > 10.0  # it went on waiting well past the timeout, and returned


def test_a_segment_that_never_started_is_named_with_what_the_others_do(tmp_path):
    db = tmp_path / "flor.db"
    _segment_rows(db, {0: "finished", 2: "running"})
    clock = _Clock({})

    with pytest.raises(ReplayError, match=r"segments \[1\] never started within 10s") as info:
        _segments.wait_for_segments(str(db), "r", 3, start_timeout=10.0, clock=clock, sleep=clock.sleep)

    assert "segments [2] are still running; segments [0] finished" in str(info.value)
    assert "segment=<i>, segments=3" in str(info.value)


def test_a_failed_segment_is_named_with_its_rank_and_error(tmp_path):
    db = tmp_path / "flor.db"
    _segment_rows(db, {0: "finished", 1: "running", 2: "running"})
    with closing(store.connect(db)) as c:
        store.update(c, "replay_segments", {"replay_id": "r", "segment": 2}, {"status": "failed", "error": "E: boom"})
    clock = _Clock({})

    with pytest.raises(ReplayError, match=r"replay r: segment 2 \(rank 2\): E: boom\. Its values so far are kept"):
        _segments.wait_for_segments(str(db), "r", 3, start_timeout=10.0, clock=clock, sleep=clock.sleep)

    assert clock.sleeps == 0  # at once, without waiting for segment 1


def _node_status(url: Path, status: str, beat: int) -> None:
    url.mkdir(parents=True, exist_ok=True)
    row = {"segment": 2, "segments": 3, "rank": 2, "node": 1, "status": status, "error": None, "beat": beat}
    (url / "node-1.rank-2.json").write_text(json.dumps({**row, "store": "node-b:/data/flor.db"}))


def test_a_node_is_waited_for_while_its_heartbeat_goes_on(tmp_path):
    db, url = tmp_path / "flor.db", tmp_path / "shared" / "replays" / "r"
    _segment_rows(db, {0: "finished", 1: "finished"})
    _node_status(url, "running", 0)
    actions = {n: (lambda n=n: _node_status(url, "running", n)) for n in range(1, 5)}
    clock = _Clock({**actions, 5: lambda: _node_status(url, "finished", 5)})

    _segments.wait_for_segments(str(db), "r", 3, nodes=str(url), stale=10.0, clock=clock, sleep=clock.sleep)

    assert clock.sleeps == 5  # 1000 s between polls, far past `stale`, but each poll heard a new beat


def test_a_node_whose_heartbeat_stopped_is_named_with_the_command_that_re_runs_its_segment(tmp_path):
    db, url = tmp_path / "flor.db", tmp_path / "shared" / "replays" / "r"
    _segment_rows(db, {0: "finished", 1: "finished"})
    _node_status(url, "running", 7)
    clock = _Clock({})

    with pytest.raises(ReplayError) as info:
        _segments.wait_for_segments(
            str(db), "r", 3, run_id="run1", nodes=str(url), stale=10.0, clock=clock, sleep=clock.sleep
        )

    assert "segment 2 (rank 2, node 1): node 1 sent no heartbeat for 10s: its process or the node died" in str(
        info.value
    )
    assert "(its values so far are in node-b:/data/flor.db)" in str(info.value)
    assert "trainer.replay(..., run='run1', segment=<i>, segments=3) on one device" in str(info.value)
    assert "for i in [2]" in str(info.value) and clock.sleeps == 1


# ---- the replay's FlorCallback is found among the Trainer's callbacks --------------------------------


def test_the_florcallback_is_found_on_flor_trainer_and_on_a_plain_trainer(project):
    mine = flor.FlorCallback()
    plain = L.Trainer(callbacks=[L.pytorch.callbacks.LearningRateMonitor(), mine], logger=False)
    flor_trainer = flor.Trainer(logger=False)

    assert _segments.flor_callback(plain) is mine
    assert _segments.flor_callback(flor_trainer) is flor_trainer.flor
    assert isinstance(flor_trainer.flor, flor.FlorCallback)


def test_a_trainer_without_a_florcallback_cannot_replay(project):
    with pytest.raises(ReplayError, match=r"no FlorCallback, so it cannot replay; use flor.Trainer or Trainer\("):
        _segments.flor_callback(L.Trainer(logger=False))


@pytest.mark.integration
def test_one_epoch_re_trained_on_two_ranks_in_two_segments_equals_one_segment(script):
    """A one-epoch run validating every 3 of its 12 batches, divided at its checkpoints inside: rank 1 starts
    from the checkpoint inside the epoch, and the two ranks store what one segment stores, bit for bit (but for
    the epoch aggregate of the new metric, which rank 1 cannot have)."""
    env = {"EPOCHS": "1", "TRAINER": json.dumps({"limit_train_batches": 12, "val_check_interval": 3})}
    run(script, "record", "1", "1", env=env)
    edit(script, *TRAIN_METRIC)
    one = report_of(run(script, "replay", "1", "1", env=env)[1])
    _, output = run(script, "replay", "2", "2", env=env | {"STRATEGY": "ddp_fork"})
    two = report_of(output)
    assert two["epochs_trained"] == [0] and two["mismatched"] == 0
    assert two["matched"] == two["rederived"] == one["rederived"] > 0
    # the new train_x2's epoch aggregate: rank 1 trained from the checkpoint inside the epoch, which holds none
    # of it, so it would cover the epoch's second half only: not stored, and said
    assert "train_x2_epoch of epoch 0 not stored" in output
    assert replayed(two["replay_id"]) == [v for v in replayed(one["replay_id"]) if "train_x2_epoch" not in v]
    [plan] = rows(script / ".flor" / "flor.db", "SELECT plan FROM replays WHERE replay_id = ?", (two["replay_id"],))
    starts = [[s["start_inside"] for s in seg] for seg in json.loads(plan["plan"])]
    assert starts[0] == [None] and starts[1][0] is not None  # rank 1 from a checkpoint inside the epoch
