"""Replay writes into the recorded run's TensorBoard, MLflow and CSV runs, on the recorded steps.

Every test records the digits model with real Lightning loggers, replays it with a new
validation metric (``val_conf``) and reads the trackers back with their own readers.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import rows, sha256
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger
from models import DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import _cli as cli
from flor_lightning._replay_loggers import CSVBesideLogger, HindsightLogger


class WithConfidence(DigitsClassifier):
    """The recorded model with a hindsight metric added to ``validation_step``."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("val_conf", self(batch[0]).softmax(1).max(1).values.mean())


class ListLogger(Logger):
    """A logger flor cannot write back to: it keeps every call it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("hparams", params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(("metrics", (metrics, step)))


def record(logger: Any) -> flor.Trainer:
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(logger=logger, log_every_n_steps=1))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return trainer


def replay(logger: Any, **kwargs: Any) -> Any:
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(logger=logger, log_every_n_steps=1, **kwargs.pop("trainer", {})))
    return trainer.replay(WithConfidence(), datamodule=DigitsData(), train=False, **kwargs)


def replayed(name: str, replay_id: str) -> list[tuple[int, float]]:
    """(step, value) of ``name``'s epoch values as flor stored them for the replay."""
    df = flor.records(name)
    df = df[(df["replay_id"] == replay_id) & (df["level"] == "epoch")]
    return list(zip(df["step"].astype(int), df["value"].astype(float), strict=True))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard run folder, read by TensorBoard's own event reader."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.integration
def test_replay_adds_the_hindsight_curve_to_the_recorded_tensorboard_run_on_its_steps(project):
    pytest.importorskip("tensorboard")
    # logger=True: Lightning's default TensorBoardLogger in ./lightning_logs, as a new user has it
    run_id = record(True).flor.run_id
    folder = project / "lightning_logs" / "version_0"
    before = scalars(folder)

    report = replay(True)

    assert sorted(p.name for p in (project / "lightning_logs").iterdir()) == ["version_0"]  # no version_1
    after = scalars(folder)
    assert {tag: len(points) for tag, points in after.items() if tag != "val_conf"} == {
        tag: len(points) for tag, points in before.items()
    }  # re-derived values (val_loss, train_loss_epoch, epoch, ...) are not logged again
    steps = [step for step, _ in after["val_conf"]]
    assert steps == [step for step, _ in before["val_loss"]]  # the recorded run's own steps for validation
    assert len(steps) == 3
    assert [v for _, v in after["val_conf"]] == pytest.approx([v for _, v in replayed("val_conf", report.replay_id)])
    [row] = rows(project / ".flor" / "flor.db", "SELECT loggers FROM runs WHERE run_id = ?", (run_id,))
    [ident] = json.loads(row["loggers"])
    assert ident["kind"] == "tensorboard" and ident["log_dir"] == str(folder)  # absolute, though the logger's is not
    assert ident["version"] == 0 and ident["save_dir"] == str(project)


class WithDoubleLoss(DigitsClassifier):
    """The recorded model with a hindsight metric on the training path (the replay re-trains)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss_x2", loss.detach() * 2)
        return loss


@pytest.mark.integration
def test_a_retrained_replay_adds_training_curves_on_the_recorded_steps_and_repeats_no_callback_values(project):
    pytest.importorskip("tensorboard")
    L.seed_everything(7)
    # LearningRateMonitor logs to the loggers directly, not through self.log: flor has no record of lr-Adam
    trainer = flor.Trainer(**trainer_kwargs(logger=True, log_every_n_steps=1, callbacks=[LearningRateMonitor()]))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    folder = project / "lightning_logs" / "version_0"
    before = scalars(folder)

    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(logger=True, log_every_n_steps=1, callbacks=[LearningRateMonitor()]))
    report = trainer.replay(WithDoubleLoss(), datamodule=DigitsData(), train=True)

    assert report.epochs_trained == [0, 1, 2] and report.mismatched == 0
    after = scalars(folder)
    assert {tag: len(points) for tag, points in after.items() if tag != "train_loss_x2"} == {
        tag: len(points) for tag, points in before.items()
    }  # lr-Adam and train_loss_step are not logged again
    assert [s for s, _ in after["train_loss_x2"]] == [s for s, _ in before["train_loss_step"]]
    assert [v for _, v in after["train_loss_x2"]] == pytest.approx([2 * v for _, v in before["train_loss_step"]])


@pytest.mark.integration
def test_replay_writes_the_recorded_mlflow_run_on_its_steps_and_tags_it(project, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recording = MLFlowLogger(experiment_name="digits", tracking_uri=uri)
    record(recording)
    client = MlflowClient(uri)
    run_before = client.get_run(recording.run_id)

    report = replay(True)

    def history(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(recording.run_id, name)]

    assert [s for s, _ in history("val_conf")] == [s for s, _ in history("val_loss")]  # the recorded steps
    assert len(history("val_loss")) == 3 and len(history("train_loss_epoch")) == 3  # nothing logged twice
    assert [v for _, v in history("val_conf")] == pytest.approx([v for _, v in replayed("val_conf", report.replay_id)])
    run = client.get_run(recording.run_id)
    assert run.data.tags["flor.replay_id"] == report.replay_id
    assert (run.info.status, run.info.end_time) == (run_before.info.status, run_before.info.end_time)
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the recorded run, no new one


@pytest.mark.integration
def test_replay_writes_a_csv_beside_the_recorded_metrics_csv_and_never_rewrites_it(project):
    record(CSVLogger(project, name="csv"))
    folder = project / "csv" / "version_0"
    recorded = sha256(folder / "metrics.csv")

    report = replay(CSVLogger(project, name="csv"))

    assert sha256(folder / "metrics.csv") == recorded
    assert sorted(p.name for p in (project / "csv").iterdir()) == ["version_0"]
    with (folder / f"metrics.flor-{report.replay_id}.csv").open() as f:
        new = list(csv.DictReader(f))
    with (folder / "metrics.csv").open() as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert list(new[0]) == ["step", "val_conf"]
    assert [int(r["step"]) for r in new] == val_steps
    assert [float(r["val_conf"]) for r in new] == pytest.approx([v for _, v in replayed("val_conf", report.replay_id)])


@pytest.mark.integration
def test_loggers_false_sends_nothing_to_any_logger(project):
    pytest.importorskip("tensorboard")
    record(True)
    folder = project / "lightning_logs" / "version_0"
    files = sorted(p.name for p in folder.iterdir())
    own = ListLogger()

    # LearningRateMonitor refuses a Trainer with no logger: the replay keeps one that drops everything
    report = replay([own], loggers=False, trainer={"callbacks": [LearningRateMonitor()]})

    assert report.new_names == ["val_conf"]  # the replay itself stored its values
    assert sorted(p.name for p in folder.iterdir()) == files
    assert sorted(p.name for p in (project / "lightning_logs").iterdir()) == ["version_0"]
    assert own.calls == []


@pytest.mark.integration
def test_a_logger_flor_cannot_write_back_to_gets_a_note_and_receives_nothing(project, capsys):
    recording = ListLogger()
    run_id = record([recording]).flor.run_id
    assert recording.calls  # the recording's own logger got its values
    own = ListLogger()

    with pytest.warns(UserWarning, match=r"ListLogger is not written to during this replay: .*`flor export`"):
        report = replay([own])

    assert report.new_names == ["val_conf"]
    assert own.calls == []
    capsys.readouterr()
    assert cli.main(["show", run_id]) == 0
    shown = capsys.readouterr().out
    assert "loggers: 1\n  other (ListLogger): kind only, flor cannot write back to it\n" in shown


@pytest.mark.integration
def test_flor_show_lists_the_recorded_loggers_runs(project, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    monkeypatch.setattr(sys, "argv", [str(project / "train.py")])
    run_id = record([TensorBoardLogger("tb", name="digits", version="first"), CSVLogger("logs")]).flor.run_id
    capsys.readouterr()

    assert cli.main(["show", run_id]) == 0

    out = capsys.readouterr().out
    assert f"loggers: 2\n  tensorboard {project / 'tb' / 'digits' / 'first'}\n" in out
    assert f"  csv {project / 'logs' / 'lightning_logs' / 'version_0'}\n" in out
    assert cli.main(["show", run_id, "--format", "json"]) == 0
    loggers = json.loads(capsys.readouterr().out)["loggers"]
    assert [(i["kind"], i["version"], i["name"]) for i in loggers] == [
        ("tensorboard", "first", "digits"),
        ("csv", 0, "lightning_logs"),
    ]


def test_hindsight_logger_passes_on_only_new_names_and_touches_nothing_until_it_has():
    inner = ListLogger()
    logger = HindsightLogger(inner, {"val_loss", "train_loss"})
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"val_loss": 1.0, "train_loss_step": 2.0, "epoch": 0}, step=3)
    logger.save()
    logger.finalize("success")
    assert inner.calls == []
    logger.log_metrics({"val_loss": 1.0, "val_f1": 0.5, "epoch": 0}, step=3)
    assert inner.calls == [("metrics", ({"val_f1": 0.5}, 3))]
    assert (logger.name, logger.version) == ("list", 0)


def test_csv_beside_logger_writes_lightnings_columns_and_rewrites_only_its_own_file(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,val_loss\n0,3,1.5\n")
    logger = CSVBesideLogger(str(tmp_path), replay_id="r.x", prefix="cv")
    logger.log_metrics({"f1": 0.5}, step=3)
    logger.finalize("success")
    logger.log_metrics({"f1": 0.6, "auc": 0.7}, step=7)  # a new column: the header grows
    logger.finalize("success")
    logger.log_metrics({"f1": 0.8}, step=11)
    logger.finalize("success")
    with (tmp_path / "metrics.flor-r.x.csv").open() as f:
        assert list(csv.reader(f)) == [
            ["cv-auc", "cv-f1", "step"],
            ["", "0.5", "3"],
            ["0.7", "0.6", "7"],
            ["", "0.8", "11"],
        ]
    assert (tmp_path / "metrics.csv").read_text() == "epoch,step,val_loss\n0,3,1.5\n"
