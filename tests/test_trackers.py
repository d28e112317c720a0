"""trackers: the recorded loggers' runs as plain data, and what a replay may send them (no Trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from flor_lightning import _trackers as trackers


class Broken(TensorBoardLogger):
    """A TensorBoard logger whose folder cannot be read."""

    @property
    def log_dir(self) -> str:
        raise RuntimeError("no connection")


def test_a_name_the_recording_has_is_not_sent_again_in_any_of_lightnings_spellings():
    recorded = {"train_loss", "train_loss_epoch", "val_loss"}
    metrics = {"train_loss_step": 1.0, "train_loss_epoch": 2.0, "val_loss": 3.0, "epoch": 0, "val_f1": 4.0}
    assert trackers.new_metrics(metrics, recorded) == {"val_f1": 4.0}
    assert trackers.new_metrics({"acc_step": 1.0, "_step": 2.0}, {"val_loss"}) == {"acc_step": 1.0, "_step": 2.0}


def test_only_names_self_log_sent_pass_when_the_logged_names_are_given():
    # LearningRateMonitor logs lr-Adam to the loggers directly: not new, only unknown to flor
    metrics = {"lr-Adam": 0.01, "train_loss_x2": 1.0}
    assert trackers.new_metrics(metrics, {"train_loss"}, logged={"train_loss_step", "train_loss_x2"}) == {
        "train_loss_x2": 1.0
    }


@pytest.mark.parametrize(
    ("uri", "absolute"),
    [
        ("sqlite:///mlflow.db", "sqlite:////proj/mlflow.db"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
        ("file:./mlruns", "file:/proj/mlruns"),
        ("file:///data/mlruns", "file:///data/mlruns"),
        ("./mlruns", "/proj/mlruns"),
        ("http://localhost:5000", "http://localhost:5000"),
        ("databricks", "databricks"),
    ],
)
def test_relative_tracking_uris_are_made_absolute(uri, absolute):
    assert trackers.absolute_uri(uri, "/proj") == absolute


def test_identity_of_tensorboard_and_csv_loggers_is_their_absolute_folder(tmp_path):
    tb = trackers.identity(TensorBoardLogger("runs", name="exp", version=3, sub_dir="fold1"), cwd=str(tmp_path))
    assert tb == {
        "kind": "tensorboard",
        "class": "lightning.pytorch.loggers.tensorboard.TensorBoardLogger",
        "save_dir": str(tmp_path / "runs"),
        "name": "exp",
        "version": 3,
        "log_dir": str(tmp_path / "runs" / "exp" / "version_3" / "fold1"),
        "prefix": "",
        "sub_dir": "fold1",
    }
    logger = CSVLogger(tmp_path / "logs", prefix="cv")
    assert trackers.identity(logger, cwd="/elsewhere")["log_dir"] == str(
        tmp_path / "logs" / "lightning_logs" / "version_0"
    )
    assert trackers.identity(logger)["prefix"] == "cv"


def test_a_logger_that_cannot_be_read_is_kept_as_its_kind_and_the_recording_goes_on():
    [ident] = trackers.identities([Broken("runs")])
    assert ident == {"kind": "tensorboard", "class": f"{__name__}.Broken", "unreadable": "RuntimeError: no connection"}
    targets, notes = trackers.plan([ident], [], run_id="r")
    assert targets == []
    assert notes == [
        "flor: the recorded tensorboard logger could not be read when the run was recorded (RuntimeError: no "
        "connection); nothing is written to it; `flor export` sends the values to TensorBoard or MLflow instead"
    ]


def test_plan_writes_into_recorded_runs_and_notes_each_logger_it_cannot_write_to():
    tb = {"kind": "tensorboard", "class": "l.TensorBoardLogger", "log_dir": "/p/lightning_logs/version_0"}
    wandb = {"kind": "wandb", "class": "l.WandbLogger"}
    mine = {"kind": "other", "class": "my.Logger"}

    targets, notes = trackers.plan(
        [tb, wandb], [{"kind": "tensorboard", "class": "l.TensorBoardLogger"}, mine, wandb], run_id="r"
    )

    assert targets == [tb]
    assert len(notes) == 2  # one per class, whether recorded, attached now, or both
    assert notes[0].startswith("flor: WandbLogger is not written to during this replay: W&B accepts only steps above")
    assert notes[1].startswith("flor: Logger is not written to during this replay: flor writes back only into")
    assert all(n.endswith("`flor export` sends the values to TensorBoard or MLflow instead") for n in notes)


def test_plan_for_a_run_recorded_before_flor_kept_loggers_writes_nothing_and_says_so():
    targets, [note] = trackers.plan(None, [{"kind": "tensorboard", "class": "l.TensorBoardLogger"}], run_id="r1")
    assert targets == []
    assert note.startswith("flor: run r1 was recorded before flor kept its loggers' runs, so no logger receives")


def test_plan_of_a_multi_process_replay_says_only_rank_zero_reaches_the_loggers():
    csv = {"kind": "csv", "class": "l.CSVLogger", "log_dir": "/p/x"}
    assert trackers.plan([csv], [], run_id="r", world_size=1) == ([csv], [])
    _, [note] = trackers.plan([csv], [], run_id="r", world_size=2)
    assert "only rank 0's segment reaches them" in note


def test_flor_show_lines_name_each_recorded_run():
    mlflow = {
        "kind": "mlflow",
        "class": "l.MLFlowLogger",
        "tracking_uri": "sqlite:////p/m.db",
        "experiment_id": "1",
        "experiment_name": "digits",
        "run_id": "abc",
    }
    assert trackers.show_lines([mlflow, {"kind": "wandb", "class": "l.WandbLogger"}]) == [
        "loggers: 2",
        "  mlflow sqlite:////p/m.db experiment 'digits' (1) run abc",
        "  wandb (WandbLogger): kind only, flor cannot write back to it",
    ]
    assert trackers.show_lines([]) == ["loggers: none"]
    assert trackers.show_lines(None)[0].startswith("loggers: not recorded")


def test_absolute_path_keeps_urls(tmp_path: Path):
    assert trackers.absolute_path("s3://bucket/logs", str(tmp_path)) == "s3://bucket/logs"
    assert trackers.absolute_path("../logs", str(tmp_path / "a")) == str(tmp_path / "logs")
