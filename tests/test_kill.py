"""A recording process killed with SIGKILL loses nothing it had flushed and leaves no half checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import git, rows, sha256

import flor_lightning as flor
from flor_lightning import store
from flor_lightning.checkpoints import CheckpointStore
from flor_lightning.shadow import SHADOW_BRANCH

pytestmark = pytest.mark.integration

SCRIPT = """\
import lightning as L
from models import DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor

L.seed_everything(0, verbose=False)
callback = flor.FlorCallback(flush_interval=0.05)
trainer = flor.Trainer(callbacks=[callback], **trainer_kwargs(max_epochs=100_000, limit_val_batches=1))
trainer.fit(DigitsClassifier(), datamodule=DigitsData())
"""


def wait_for(condition, timeout: float, proc: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"the recording process exited early ({proc.returncode}):\n{out[-3000:]}")
        try:
            if condition():
                return
        except Exception:  # the store may not exist or be initialised yet
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the recording process did not flush values and checkpoints within {timeout} s")


def test_sigkill_keeps_flushed_values_and_complete_checkpoints(project: Path, flor_home: Path) -> None:
    (project / "record.py").write_text(SCRIPT)
    db = project / ".flor" / "flor.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "record.py"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: len(rows(db, "SELECT epoch FROM checkpoints")) >= 4, timeout=45, proc=proc)
        time.sleep(0.3)  # let it get into the middle of something
        seen = rows(db, "SELECT run_id, stage, level, epoch, step, name, value FROM logs ORDER BY rowid")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    conn = store.connect(db)  # the store opens (and its schema is intact)
    conn.close()
    runs = flor.runs()
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "crashed"
    assert run["script"] == "record.py"

    # every value flushed before the kill is still there
    after = rows(db, "SELECT run_id, stage, level, epoch, step, name, value FROM logs ORDER BY rowid")
    assert len(seen) > 0
    assert after[: len(seen)] == seen
    assert len(flor.query("train_loss")) >= len([r for r in seen if r["name"] == "train_loss"])

    # every indexed checkpoint is complete; no temporary file is indexed
    indexed = rows(db, "SELECT epoch, path, sha256, size FROM checkpoints ORDER BY epoch")
    folder = flor_home / "proj" / run["run_id"]
    reader = CheckpointStore(str(folder))
    for row in indexed:
        path = Path(row["path"])
        assert path.parent == folder
        assert ".tmp-" not in path.name
        assert (sha256(path), path.stat().st_size) == (row["sha256"], row["size"])
    reader.load(indexed[-1]["path"], indexed[-1]["sha256"])
    # A file renamed into place but not yet indexed can exist only for the write in flight at the
    # kill (rename, then index): it must then be the newest one, and complete.
    final = {p for p in folder.iterdir() if ".tmp-" not in p.name and not p.name.startswith(".probe-")}
    unindexed = final - {Path(r["path"]) for r in indexed}
    assert len(unindexed) <= 1
    for path in unindexed:
        assert path.name == f"epoch={indexed[-1]['epoch'] + 1:05d}.ckpt"
        assert reader.load(str(path), None)["flor"]["run_id"] == run["run_id"]

    # the code snapshot of the killed run is on the shadow branch
    assert git(project, "rev-parse", "--verify", f"{SHADOW_BRANCH}^{{commit}}") == run["shadow_commit"]
    assert git(project, "show", f"{run['shadow_commit']}:record.py") == SCRIPT.rstrip("\n")
