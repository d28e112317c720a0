"""The README's first command: the hindsight demo records digits.py, replays it with val_f1, prints the query."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import git

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.integration
def test_hindsight_demo_replays_a_new_metric_onto_every_recorded_epoch(
    tmp_path: Path, flor_home: Path, git_env: None
) -> None:
    work = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "hindsight_demo.py"), "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    report = done.stderr  # the replay report is logged
    assert "epochs restored: 0-5; re-trained: -" in report and "mismatched: 0" in report
    header, *rows = out[out.rindex("run_id  epoch") :].splitlines()[:7]
    columns = header.split()
    assert columns[-3:] == ["val_acc", "val_f1", "val_loss"]
    f1 = [float(row.split()[columns.index("val_f1")]) for row in rows]
    assert [int(row.split()[1]) for row in rows] == list(range(6))
    assert all(0 < v <= 1 for v in f1) and f1[-1] > f1[0]  # a real metric of a model that learns
    assert any(flor_home.rglob("epoch=00005.manifest"))  # flor's checkpoints live under FLOR_HOME
    # Lightning's defaults are on: its logger and ModelCheckpoint write into the demo repository,
    # (Lightning's default logger is TensorBoard's where tensorboard is installed, else a CSVLogger)
    logs = work / "lightning_logs"
    assert any(logs.rglob("*.ckpt")) and any([*logs.rglob("metrics.csv"), *logs.rglob("events.out.tfevents.*")])
    # and every code snapshot (the run's and the replay's) holds the code alone, as flor show says
    assert "left out of the code snapshot:\n  lightning_logs/: written by the Trainer\n" in out
    snapshots = git(work, "rev-list", "flor.shadow").split()
    assert len(snapshots) == 2
    assert all(git(work, "ls-tree", "-r", "--name-only", c) == "digits.py" for c in snapshots)
