"""What a run's row says, gathered from a module, a datamodule and a Trainer that has not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from models import DigitsClassifier, DigitsData, trainer_kwargs

from flor_lightning._locate import Location
from flor_lightning._metadata import hyperparameters, new_run_id, run_row, trainer_settings
from flor_lightning._shadow import CodeVersion


class LrData(DigitsData):
    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_hyperparameters_merge_the_datamodules_and_prefix_a_clash() -> None:
    merged = hyperparameters(DigitsClassifier(hidden=8), None, LrData())
    assert merged == {"hidden": 8, "lr": 0.01, "dropout": 0.2, "batch_size": 32, "shuffle": True, "datamodule.lr": 0.5}
    assert hyperparameters(DigitsClassifier(), None) == {"hidden": 32, "lr": 0.01, "dropout": 0.2}


def test_run_ids_sort_by_start_and_differ_within_a_second() -> None:
    earlier, later = new_run_id(1_700_000_000.0), new_run_id(1_700_000_061.0)
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", earlier)
    assert earlier < later
    assert len({new_run_id(1_700_000_000.0) for _ in range(20)}) == 20


@pytest.fixture
def trainer() -> L.Trainer:
    return L.Trainer(**trainer_kwargs(max_epochs=4, accumulate_grad_batches=2, gradient_clip_val=1.5))


def test_trainer_settings_are_what_a_replay_checks(trainer: L.Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    settings = trainer_settings(trainer)
    assert settings["max_epochs"] == 4
    assert settings["accumulate_grad_batches"] == 2
    assert settings["gradient_clip_val"] == 1.5
    assert settings["seed"] == "11"
    assert settings["deterministic"] is True
    assert settings["precision"] == "32-true"
    assert (settings["world_size"], settings["num_devices"], settings["num_nodes"]) == (1, 1, 1)
    json.dumps(settings)  # stored as JSON


def test_the_run_row_describes_the_script_code_and_versions(trainer: L.Trainer, tmp_path: Path) -> None:
    loc = Location(root=tmp_path, in_git=True, db_path=tmp_path / ".flor" / "flor.db", project="proj")
    version = CodeVersion("abc", "def", "main", (), {"logs/": "written by the Trainer"})
    argv = [str(tmp_path / "train.py"), "--lr", "0.1"]

    row = run_row(
        "r1", loc=loc, trainer=trainer, pl_module=DigitsClassifier(), version=version, checkpoint_root="x", argv=argv
    )

    assert (row["run_id"], row["project"], row["script"], row["argv"]) == ("r1", "proj", "train.py", ["--lr", "0.1"])
    assert (row["shadow_commit"], row["head_commit"], row["branch"]) == ("abc", "def", "main")
    assert row["left_out"] == {"logs/": "written by the Trainer"} and row["checkpoint_root"] == "x"
    assert row["hparams"]["hidden"] == 32 and row["settings"]["max_epochs"] == 4
    assert row["versions"]["torch"] == torch.__version__ and row["versions"]["lightning"] == L.__version__
    # what the run session owns is not described here
    assert not {"started", "status", "pid", "host"} & set(row)


def test_a_run_without_a_code_snapshot_has_no_commits(trainer: L.Trainer, tmp_path: Path) -> None:
    loc = Location(root=tmp_path, in_git=False, db_path=tmp_path / "flor.db", project="plain")
    row = run_row(
        "r2", loc=loc, trainer=trainer, pl_module=DigitsClassifier(), version=None, checkpoint_root=None, argv=[]
    )
    assert [row[k] for k in ("shadow_commit", "head_commit", "branch", "left_out", "script")] == [None] * 5
    assert row["argv"] == []
