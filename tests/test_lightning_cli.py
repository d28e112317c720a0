"""flor.LightningCLI: ``fit`` records, ``replay`` replays, as subprocesses on a config file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import git, rows, user_git_state

import flor_lightning as flor
from flor_lightning._errors import ConfigError

pytest.importorskip("jsonargparse")

SCRIPT = """
import flor_lightning as flor
from model import DigitsClassifier, DigitsData

if __name__ == "__main__":
    flor.LightningCLI(DigitsClassifier, DigitsData, seed_everything_default=0)
"""
CONFIG = """
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  limit_train_batches: 4
  limit_val_batches: 2
  deterministic: true
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger: false
model:
  hidden: 16
  lr: 0.02
"""
ACC = 'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())'
NEW_METRIC = ACC + '\n        self.log(f"{prefix}_conf", logits.softmax(1).max(1).values.mean())'


@pytest.fixture
def cli_project(project: Path) -> Path:
    (project / "model.py").write_text((Path(__file__).parent / "models.py").read_text())
    (project / "train_cli.py").write_text(SCRIPT)
    (project / "cfg.yaml").write_text(CONFIG)
    (project / ".gitignore").write_text("*.log\nconfig.yaml\n")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "a LightningCLI script")
    return project


def cli(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "train_cli.py", *args],
        cwd=root,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"train_cli.py {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


def add_metric(root: Path) -> None:
    path = root / "model.py"
    path.write_text(path.read_text().replace(ACC, NEW_METRIC))


@pytest.mark.integration
def test_fit_records_and_replay_stores_a_new_metric(cli_project: Path) -> None:
    cli(cli_project, "fit", "--config", "cfg.yaml")
    db = cli_project / ".flor" / "flor.db"
    [run] = rows(db, "SELECT run_id, script, argv, cwd, hparams FROM runs")
    assert run["script"] == "train_cli.py" and '"fit"' in run["argv"] and '"hidden": 16' in run["hparams"]
    assert run["cwd"] == "."  # the folder it ran in, from the repository root
    add_metric(cli_project)

    out = cli(cli_project, "replay", "--config", "cfg.yaml", "--segments", "2")

    assert "epochs restored: 0-1" in out
    conf = rows(db, "SELECT replay_id, epoch FROM logs WHERE name = 'val_conf' AND run_id = ?", (run["run_id"],))
    assert conf and {r["epoch"] for r in conf} == {0, 1} and all(r["replay_id"] for r in conf)
    [replay] = rows(db, "SELECT status, report, pid, host FROM replays")
    assert replay["status"] == "finished" and '"mismatched": 0' in replay["report"]
    assert replay["pid"] > 0 and replay["host"] == socket.gethostname()  # the process that registered it


@pytest.mark.integration
def test_replay_runs_replays_a_lightning_cli_run_from_its_version(cli_project: Path) -> None:
    cli(cli_project, "fit", "--config", "cfg.yaml")
    add_metric(cli_project)
    before = user_git_state(cli_project)

    [result] = flor.replay_runs(echo=lambda _: None)

    assert (result.status, result.merge) == ("replayed", "merged"), result
    assert result.new_names == ["val_conf"] and result.mismatched == 0 and result.epochs_restored == [0, 1]
    assert user_git_state(cli_project) == before


@pytest.mark.integration
def test_replay_has_its_options_in_the_help(cli_project: Path) -> None:
    out = cli(cli_project, "replay", "--help")
    for option in ("--run", "--segments", "--segment", "--train", "--epochs", "--config"):
        assert option in out


def test_a_trainer_class_that_cannot_replay_is_refused() -> None:
    import lightning.pytorch as pl

    with pytest.raises(ConfigError, match=r"trainer_class must be flor_lightning\.Trainer"):
        flor.LightningCLI(trainer_class=pl.Trainer, run=False, args=[])  # type: ignore[arg-type]
