"""flor export: recorded and hindsight values into TensorBoard event files and MLflow runs, read back."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from test_replay_loggers import record, replay, scalars

import flor_lightning as flor
from flor_lightning import _cli as cli
from flor_lightning._tracker_export import export_mlflow, export_tensorboard, export_values, mlflow_name


def frame(rows: list[tuple[str | None, str, int, int, object]]) -> pd.DataFrame:
    """flor.records-shaped rows of run r1: (replay_id, name, epoch, step, value)."""
    return pd.DataFrame(
        [("r1", rep, "validate", "epoch", epoch, step, None, name, value) for rep, name, epoch, step, value in rows],
        columns=["run_id", "replay_id", "stage", "level", "epoch", "step", "batch_idx", "name", "value"],
    )


def test_export_values_are_what_query_shows_recorded_plus_the_latest_replay_of_each_new_name():
    rec = frame(
        [
            (None, "val_loss", 0, 4, 0.9),  # a per-batch value, then the epoch aggregate on the same step
            (None, "val_loss", 0, 4, 1.0),
            (None, "val_loss", 1, 8, math.nan),
            (None, "note", 1, 8, "text"),
            ("r1.a", "val_f1", 0, 4, 0.1),  # an earlier replay of val_f1
            ("r1.a", "val_f1", 1, 8, 0.2),
            ("r1.b", "val_loss", 0, 4, 1.0),  # re-derived: the recorded value stays
            ("r1.b", "val_f1", 0, 4, 0.3),
            ("r1.b", "val_f1", 1, 8, 0.4),
        ]
    )
    out = export_values(rec)
    assert list(out.columns) == ["run_id", "replay_id", "name", "epoch", "step", "value"]
    got = list(zip(out["replay_id"], out["name"], out["step"], out["value"], strict=True))
    assert got[0] == (None, "val_loss", 4, 1.0)
    assert got[1][:3] == (None, "val_loss", 8) and math.isnan(got[1][3])
    assert got[2:] == [("r1.b", "val_f1", 4, 0.3), ("r1.b", "val_f1", 8, 0.4)]


def test_mlflow_names_keep_what_mlflow_accepts():
    assert mlflow_name("val loss/x-1.5") == "val loss/x-1.5"
    assert mlflow_name("f1@k=5") == "f1_k_5"


@pytest.fixture
def replayed_run(project: Path) -> tuple[str, str]:
    """A run recorded with no logger at all, then replayed with a new metric: (run id, replay id)."""
    run_id = record(False).flor.run_id
    return run_id, replay(False).replay_id


def recorded_steps(run_id: str, name: str, replay_id: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of ``name``'s epoch values in flor's store."""
    df = flor.records(name, run=run_id)
    df = df[(df["level"] == "epoch") & (df["replay_id"].isna() if replay_id is None else df["replay_id"] == replay_id)]
    return list(zip(df["step"].astype(int), df["value"].astype(float), strict=True))


@pytest.mark.integration
def test_tensorboard_export_has_recorded_and_hindsight_curves_on_the_recorded_steps(replayed_run, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run_id, replay_id = replayed_run

    assert cli.main(["export", "--tensorboard", str(tmp_path / "tb"), "--format", "csv"]) == 0
    assert cli.main(["export", "--tensorboard", str(tmp_path / "tb")]) == 0  # again: replaces, never duplicates

    folder = tmp_path / "tb" / run_id
    assert len(list(folder.glob("events.out.tfevents.*.flor"))) == 1
    curves = scalars(folder)
    val_loss = recorded_steps(run_id, "val_loss")
    assert [s for s, _ in curves["val_loss"]] == [s for s, _ in val_loss] and len(val_loss) == 3
    assert [v for _, v in curves["val_loss"]] == pytest.approx([v for _, v in val_loss])
    hindsight = recorded_steps(run_id, "val_conf", replay_id)
    assert [s for s, _ in curves["val_conf"]] == [s for s, _ in val_loss]  # beside the recorded curve
    assert [v for _, v in curves["val_conf"]] == pytest.approx([v for _, v in hindsight])
    assert len(curves["train_loss"]) == 12  # one per recorded step: 3 epochs of 4 batches
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "run_id,target,where,values,replayed"
    assert f"{run_id},tensorboard,{folder}," in out


@pytest.mark.integration
def test_mlflow_export_makes_one_run_per_flor_run_and_running_it_twice_adds_nothing(replayed_run, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    run_id, replay_id = replayed_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    [first] = export_mlflow(uri, experiment="digits")
    [again] = export_mlflow(uri, experiment="digits", run=run_id)

    assert again.where == first.where and again.values == 0 and first.values > 0 and first.replayed == 3
    client = MlflowClient(uri)
    [ml] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert ml.info.run_id == first.where and ml.info.status == "FINISHED"
    [row] = flor.runs().to_dict("records")
    assert ml.data.tags["flor.run_id"] == run_id
    assert ml.data.tags["flor.shadow_commit"] == row["shadow_commit"] and row["shadow_commit"]
    assert ml.data.params == {k: str(v) for k, v in row["hparams"].items()}

    def history(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(ml.info.run_id, name)]

    assert history("val_loss") == recorded_steps(run_id, "val_loss")
    assert [s for s, _ in history("val_conf")] == [s for s, _ in recorded_steps(run_id, "val_loss")]
    assert [v for _, v in history("val_conf")] == pytest.approx(
        [v for _, v in recorded_steps(run_id, "val_conf", replay_id)]
    )


def test_export_of_an_unknown_run_or_without_a_destination_says_what_to_do(project, capsys):
    flor_db = project / ".flor" / "flor.db"
    from flor_lightning import _store as store

    store.connect(flor_db).close()
    assert cli.main(["export", "--run", "nope"]) == 2
    assert "needs a destination: --tensorboard DIR and/or --mlflow URI" in capsys.readouterr().err
    assert cli.main(["export", "--tensorboard", "tb", "--run", "nope"]) == 1
    assert "unknown run id 'nope'" in capsys.readouterr().err
    with pytest.raises(flor.UnknownRunError, match=r"unknown run id 'nope'"):
        export_tensorboard("tb", run="nope")
    assert export_tensorboard("tb") == []  # no runs: nothing written
    assert not (project / "tb").exists()
