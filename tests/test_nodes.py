"""Node stores: a rank off the launching node publishes its records beside the checkpoints; the
launching node merges each store once. Real sqlite files and a real folder as the shared location."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest
from helpers import rows

from flor_lightning import _nodes as nodes
from flor_lightning import _store as store
from flor_lightning._errors import ConfigError, StoreError

REPLAY = "run1.r000001"


def segment_row(status: str, error: str | None = None) -> dict:
    return {
        "replay_id": REPLAY,
        "segment": 1,
        "segments": 2,
        "rank": 1,
        "node": 1,
        "pid": 1,
        "host": "node-1",
        "status": status,
        "epochs": [2, 3],
        "error": error,
    }


def node_with_values(tmp_path: Path, values: int = 3, shared: str | None = None) -> nodes.NodeStore:
    """Node 1's store with ``values`` logged values and its segment running, as a replaying rank leaves it;
    ``shared`` is the checkpoint root both nodes reach (default: a local folder)."""
    url = nodes.folder(shared or str(tmp_path / "shared"), "run1", REPLAY)
    node = nodes.NodeStore(tmp_path / "node1" / "flor.db", url, replay_id=REPLAY, node=1, rank=1)
    with closing(store.connect(node.path)) as c:
        store.insert(c, "replay_segments", {**segment_row("running"), "started": 1.0})
        for i in range(values):
            log = {"run_id": "run1", "replay_id": REPLAY, "stage": "validate", "level": "epoch", "epoch": 2 + i % 2}
            store.insert(c, "logs", {**log, "step": i, "name": "val_conf", "value": 0.5 + i})
        store.insert(c, "replay_epochs", {"replay_id": REPLAY, "epoch": 2, "action": "restore", "wanted": 1})
    return node


def end(node: nodes.NodeStore, status: str, error: str | None = None) -> None:
    """The segment ends as SegmentRunner ends it: its row in the node's store, then the store published."""
    with closing(store.connect(node.path)) as c:
        store.update(c, "replay_segments", {"replay_id": REPLAY, "segment": 1}, {"status": status, "error": error})
    node.ended(segment_row(status, error))


def count(db: Path, table: str) -> int:
    return int(rows(db, f"SELECT count(*) AS n FROM {table}")[0]["n"])


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_a_node_store_is_published_and_merged_exactly_once(tmp_path, where):
    shared = f"memory://{tmp_path.name}/shared" if where == "memory" else None  # another fsspec filesystem
    node = node_with_values(tmp_path, shared=shared)
    node.running(segment_row("running"))
    assert nodes.statuses(node.url)[1]["status"] == "running"
    end(node, "finished")
    project = tmp_path / "project.db"

    first = nodes.merge(project, node.url, REPLAY, clock=time.time)
    again = nodes.merge(project, node.url, REPLAY, clock=time.time)

    assert nodes.statuses(node.url)[1]["status"] == "finished"
    assert first.merged == ["node-1.rank-1.sqlite"] and first.rows == 3 + 1 + 1
    assert again.merged == [] and again.already == ["node-1.rank-1.sqlite"] and again.rows == 0
    assert count(project, "logs") == 3 and count(project, "replay_epochs") == 1
    [seg] = rows(project, "SELECT segment, node, status FROM replay_segments")
    assert (seg["segment"], seg["node"], seg["status"]) == (1, 1, "finished")


def test_the_heartbeat_goes_on_while_the_segment_runs_and_stops_at_its_end(tmp_path):
    node = node_with_values(tmp_path)
    node.running(segment_row("running"), interval=0.01)
    deadline = time.monotonic() + 30
    while nodes.statuses(node.url)[1]["beat"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    end(node, "failed", "RuntimeError: boom")
    final = nodes.statuses(node.url)[1]
    time.sleep(0.05)

    assert final["beat"] >= 2 and final["status"] == "failed" and final["error"] == "RuntimeError: boom"
    assert nodes.statuses(node.url)[1] == final  # no beat after the end
    assert final["store"].endswith(str(node.path))  # where its values stay on its node


def test_a_merge_that_fails_midway_adds_nothing_and_the_next_adds_everything_once(tmp_path):
    node = node_with_values(tmp_path)
    end(node, "finished")
    published = Path(node.url) / "node-1.rank-1.sqlite"
    good = published.read_bytes()
    with closing(sqlite3.connect(published)) as c:  # the last table the merge copies is gone
        c.execute("DROP TABLE replay_bad_checkpoints")
        c.commit()
    project = tmp_path / "project.db"

    with pytest.raises(StoreError):
        nodes.merge(project, node.url, REPLAY, clock=time.time)
    assert count(project, "logs") == 0 and count(project, "replay_merges") == 0  # rolled back as a whole

    published.write_bytes(good)
    assert nodes.merge(project, node.url, REPLAY, clock=time.time).rows == 5
    assert nodes.merge(project, node.url, REPLAY, clock=time.time).rows == 0
    assert count(project, "logs") == 3


def test_the_merge_of_a_replay_the_store_does_not_hold_says_where_to_run_it(tmp_path):
    with pytest.raises(Exception, match=r"holds no replay 'nope'.*Merge on the node that launched the replay"):
        nodes.replay_folder(tmp_path / "project.db", "nope")


def test_a_status_being_replaced_is_read_at_the_next_poll(tmp_path):
    url = nodes.folder(str(tmp_path), "run1", REPLAY)
    Path(url).mkdir(parents=True)
    (Path(url) / "node-1.rank-1.json").write_text('{"segment": 1, "sta')  # half a file: never published so
    (Path(url) / "node-2.rank-2.json").write_text(json.dumps({**segment_row("running"), "segment": 2}))

    assert list(nodes.statuses(url)) == [2]


def test_the_heartbeat_period_comes_from_the_environment_and_a_bad_one_says_what_it_must_be():
    assert nodes.heartbeat_seconds({}) == nodes.HEARTBEAT_S
    assert nodes.heartbeat_seconds({"FLOR_HEARTBEAT_S": "0.5"}) == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(ConfigError, match=r"FLOR_HEARTBEAT_S=.* must be a number of seconds above 0"):
            nodes.heartbeat_seconds({"FLOR_HEARTBEAT_S": bad})
