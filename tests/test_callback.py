"""FlorCallback end to end: a real Trainer, a real sqlite store, a real git repository."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import pandas as pd
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from helpers import git, rows, user_git_state
from models import TEST_BATCHES, TRAIN_BATCHES, VAL_BATCHES, DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import ConfigError, FlorCallback
from flor_lightning import _cli as cli
from flor_lightning._callback import RecordStats
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._shadow import SHADOW_BRANCH

EPOCHS = 3
RUN_LEVEL = ["run_id", "started", "status", "script", "shadow_commit"]


def fit(model: L.LightningModule | None = None, *, seed: int = 0, **overrides: object) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    callbacks = overrides.pop("callbacks", [FlorCallback()])
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(model or DigitsClassifier(), datamodule=DigitsData())
    return trainer


def the_run() -> pd.Series:
    runs = flor.runs()
    assert len(runs) == 1
    return runs.iloc[0]


def values(df: pd.DataFrame, name: str, level: str = "step", stage: str | None = None) -> pd.DataFrame:
    keep = (df["name"] == name) & (df["level"] == level)
    if stage is not None:
        keep &= df["stage"] == stage
    return df[keep].reset_index(drop=True)


class Chatty(DigitsClassifier):
    """Logs past the logger (``logger=False``), from epoch-end hooks, and NaN/inf values."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("double_loss", loss * 2, logger=False, prog_bar=False)
        self.log("nan_metric", math.nan)
        self.log("inf_metric", torch.tensor(math.inf))
        self.log("neg_inf_metric", -math.inf)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        self.log("val_hook", float(self.current_epoch))


# ---- the run row -------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_row_describes_the_run(project: Path, flor_home: Path) -> None:
    head = git(project, "rev-parse", "HEAD")

    fit(seed=7, accumulate_grad_batches=2)

    run = the_run()
    assert run["status"] == "finished"
    assert run["ended"] >= run["started"]
    assert run["project"] == "proj"
    assert run["script"] == "train.py"
    assert run["argv"] == ["--epochs", "3"]
    assert run["hparams"] == {"hidden": 32, "lr": 0.01, "dropout": 0.2, "batch_size": 32, "shuffle": True}
    settings = run["settings"]
    assert settings["max_epochs"] == EPOCHS
    assert settings["deterministic"] is True
    assert settings["accumulate_grad_batches"] == 2
    assert settings["world_size"] == 1
    assert settings["num_devices"] == 1
    assert settings["seed"] == "7"
    assert settings["precision"] == "32-true"
    assert settings["limit_train_batches"] == TRAIN_BATCHES
    assert run["versions"]["torch"] == torch.__version__
    assert run["versions"]["lightning"] == L.__version__
    assert run["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert run["shadow_commit"] == git(project, "rev-parse", SHADOW_BRANCH)
    assert run["head_commit"] == head
    assert run["branch"] == "main"
    assert run["checkpoint_root"] == f"{flor_home}/proj"
    assert (project / ".flor" / "flor.db").is_file()


@pytest.mark.integration
def test_datamodule_hyperparameter_clashing_with_the_model_is_prefixed(project: Path) -> None:
    class Data(DigitsData):
        def __init__(self, lr: float = 0.5) -> None:
            super().__init__()
            self.save_hyperparameters()

    L.seed_everything(0, verbose=False)
    L.Trainer(callbacks=[FlorCallback()], **trainer_kwargs(max_epochs=1)).fit(DigitsClassifier(), datamodule=Data())

    hparams = the_run()["hparams"]
    assert hparams["lr"] == 0.01
    assert hparams["datamodule.lr"] == 0.5


# ---- logged values -------------------------------------------------------------------------------


@pytest.mark.integration
def test_every_value_is_recorded_whatever_the_logger_settings(project: Path) -> None:
    trainer = fit(Chatty(), log_every_n_steps=50)
    trainer.test(trainer.lightning_module, datamodule=DigitsData())

    rec = flor.records()
    run_id = the_run()["run_id"]
    assert set(rec["run_id"]) == {run_id}
    assert rec["replay_id"].isna().all()

    # every training step, although log_every_n_steps=50 would let a logger see none of them
    loss = values(rec, "train_loss", stage="train")
    assert list(loss["epoch"]) == [e for e in range(EPOCHS) for _ in range(TRAIN_BATCHES)]
    assert list(loss["step"]) == list(range(EPOCHS * TRAIN_BATCHES))
    assert list(loss["batch_idx"]) == list(range(TRAIN_BATCHES)) * EPOCHS
    # logger=False on the self.log call does not hide a value from flor
    double = values(rec, "double_loss")
    assert list(double["value"]) == [2 * v for v in loss["value"]]

    # on_step + on_epoch: one aggregate per epoch, named as Lightning's loggers name it
    epoch_loss = values(rec, "train_loss_epoch", level="epoch")
    assert list(epoch_loss["epoch"]) == list(range(EPOCHS))
    assert epoch_loss["batch_idx"].isna().all()
    means = loss.groupby("epoch")["value"].mean()
    assert epoch_loss["value"].tolist() == pytest.approx(means.tolist(), rel=1e-6)
    assert values(rec, "train_loss", level="epoch").empty

    # logged from on_train_epoch_end: stored once per epoch, as it was logged
    lr = values(rec, "lr", level="epoch")
    assert list(lr["epoch"]) == list(range(EPOCHS))
    assert lr["value"].tolist() == pytest.approx([0.005, 0.0025, 0.00125])  # StepLR has stepped by then
    assert values(rec, "lr").empty

    # validation: per batch and once per epoch; the sanity check is not recorded
    val = values(rec, "val_loss", stage="validate")
    assert list(val["epoch"]) == [e for e in range(EPOCHS) for _ in range(VAL_BATCHES)]
    val_epoch = values(rec, "val_loss", level="epoch", stage="validate")
    assert list(val_epoch["epoch"]) == list(range(EPOCHS))
    assert list(val_epoch["step"]) == [TRAIN_BATCHES * (e + 1) for e in range(EPOCHS)]
    assert list(values(rec, "val_hook", level="epoch")["value"]) == [0.0, 1.0, 2.0]

    # test, after fit: into the same run, whose status stays finished
    test = rec[rec["stage"] == "test"]
    assert len(values(test, "test_loss")) == TEST_BATCHES
    assert len(values(test, "test_loss", level="epoch")) == 1
    assert the_run()["status"] == "finished"


@pytest.mark.integration
def test_nan_and_inf_are_stored_and_read_back(project: Path) -> None:
    fit(Chatty(), max_epochs=1)

    rec = flor.records()
    nan = values(rec, "nan_metric")["value"]
    assert len(nan) == TRAIN_BATCHES
    assert all(isinstance(v, float) and math.isnan(v) for v in nan)
    assert list(values(rec, "inf_metric")["value"]) == [math.inf] * TRAIN_BATCHES
    assert list(values(rec, "neg_inf_metric")["value"]) == [-math.inf] * TRAIN_BATCHES
    table = flor.query("inf_metric", "nan_metric")
    assert table["inf_metric"].dtype == "float64"
    assert (table["inf_metric"].dropna() == math.inf).sum() == TRAIN_BATCHES


@pytest.mark.integration
def test_values_lightning_refuses_are_not_recorded(project: Path) -> None:
    """A string or a multi-element tensor never reaches the store: Lightning's own error surfaces."""

    class Refused(DigitsClassifier):
        def __init__(self, value: object) -> None:
            super().__init__()
            self.value = value

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 1:
                self.log("refused", self.value)
            return loss

    for value in ("a string", torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"self\.log"):
            fit(Refused(value), max_epochs=1)

    rec = flor.records()
    assert "refused" not in set(rec["name"])
    assert set(flor.runs()["status"]) == {"failed"}


@pytest.mark.integration
def test_torchmetrics_metric_step_values_are_numbers(project: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithMetric(DigitsClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.acc(self(x), y)
            self.log("train_acc", self.acc, on_step=True, on_epoch=True)
            return super().training_step(batch, batch_idx)

    fit(WithMetric(), max_epochs=1)

    rec = flor.records()
    step = values(rec, "train_acc")
    assert len(step) == TRAIN_BATCHES
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in step["value"])


@pytest.mark.integration
def test_flor_trainer_records_what_the_callback_records(project: Path) -> None:
    fit(callbacks=[FlorCallback()])
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(**trainer_kwargs())
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())

    first, second = flor.runs()["run_id"]
    assert trainer.flor.run_id == second
    tables = [flor.query(run=run_id).drop(columns=RUN_LEVEL) for run_id in (first, second)]
    assert len(tables[0]) == EPOCHS * (TRAIN_BATCHES + 1)
    pd.testing.assert_frame_equal(tables[0], tables[1])
    long = [flor.records(run=run_id).drop(columns="run_id") for run_id in (first, second)]
    pd.testing.assert_frame_equal(long[0], long[1])


# ---- configuration errors ------------------------------------------------------------------------


@pytest.mark.integration
def test_two_callbacks_on_a_lightning_trainer_are_refused(project: Path) -> None:
    # Lightning refuses two stateful callbacks with one state_key as the Trainer is built, so
    # FlorCallback.setup's own ConfigError is never reached on a plain lightning Trainer.
    with pytest.raises((ConfigError, RuntimeError), match="FlorCallback"):
        fit(callbacks=[FlorCallback(), FlorCallback()])

    assert not (project / ".flor" / "flor.db").exists()


def test_two_callbacks_on_a_flor_trainer_raise_config_error(project: Path) -> None:
    with pytest.raises(ConfigError, match="FlorCallback"):
        flor.Trainer(callbacks=[FlorCallback(), FlorCallback()], **trainer_kwargs())


@pytest.mark.integration
def test_flor_trainer_uses_the_callback_it_is_given(project: Path) -> None:
    mine = FlorCallback(checkpoint_every=2)
    trainer = flor.Trainer(callbacks=[mine], **trainer_kwargs(max_epochs=1))
    assert trainer.flor is mine
    assert sum(isinstance(cb, FlorCallback) for cb in trainer.callbacks) == 1


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_checkpoint_every_must_be_a_positive_whole_number(every: object) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every"):
        FlorCallback(checkpoint_every=every)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, "2%", None])
def test_checkpoint_budget_must_be_a_fraction(budget: object) -> None:
    with pytest.raises(ConfigError, match="checkpoint_budget"):
        FlorCallback(checkpoint_every="auto", checkpoint_budget=budget)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [-1, 1.5, True, "5MB", None])
def test_max_file_bytes_is_checked_when_given(limit: object) -> None:
    with pytest.raises(ConfigError, match=r"max_file_bytes must be a whole number of bytes >= 0, got"):
        FlorCallback(max_file_bytes=limit)  # type: ignore[arg-type]
    assert FlorCallback(max_file_bytes=0).max_file_bytes == 0


def test_flush_interval_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="flush_interval"):
        FlorCallback(flush_interval=0)


def test_checkpoint_dir_without_parent_is_refused_at_construction(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for bad in (tmp_path / "missing" / "ckpts", a_file / "ckpts"):
        with pytest.raises(ConfigError, match="parent folder does not exist"):
            FlorCallback(checkpoint_dir=str(bad))


class CountingSteps(DigitsClassifier):
    steps = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.integration
@pytest.mark.parametrize("where", ["under-a-file", "a-file"])
def test_unwritable_checkpoint_location_fails_before_training(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("FLOR_HOME", str(a_file / "home" if where == "under-a-file" else a_file))
    model = CountingSteps()

    with pytest.raises(ConfigError, match="FLOR_HOME"):
        fit(model)

    assert CountingSteps.steps == 0
    # the check runs before any run is written: no run left 'running' and no values
    db = project / ".flor" / "flor.db"
    assert not db.exists() or (rows(db, "SELECT * FROM runs") == [] and rows(db, "SELECT * FROM logs") == [])


@pytest.mark.integration
def test_failing_training_step_marks_the_run_failed(project: Path) -> None:
    class Failing(DigitsClassifier):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            if self.current_epoch == 1 and batch_idx == 2:
                raise RuntimeError("boom in training_step")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom in training_step"):
        fit(Failing())

    run = the_run()
    assert run["status"] == "failed"
    assert not pd.isna(run["ended"])
    loss = values(flor.records(), "train_loss")
    assert list(zip(loss["epoch"], loss["batch_idx"], strict=True)) == [(0, b) for b in range(TRAIN_BATCHES)] + [
        (1, 0),
        (1, 1),
    ]
    checkpoints = rows(project / ".flor" / "flor.db", "SELECT epoch, path FROM checkpoints")
    assert 0 in {c["epoch"] for c in checkpoints}  # epoch 0 was complete
    assert all(Path(c["path"]).is_file() for c in checkpoints)


@pytest.mark.integration
def test_test_without_fit_is_a_finished_run_of_its_own(project: Path) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[FlorCallback()], **trainer_kwargs())
    trainer.test(DigitsClassifier(), datamodule=DigitsData())

    rec = flor.records()
    assert len(values(rec, "test_loss", level="epoch", stage="test")) == 1
    assert the_run()["status"] == "finished"


# ---- git -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_recording_leaves_the_users_git_state_alone(project: Path) -> None:
    (project / "train.py").write_text("print('edited, not committed')\n")
    (project / "notes.md").write_text("untracked\n")
    (project / "debug.log").write_text("ignored\n")
    before = user_git_state(project)

    fit(max_epochs=1)

    assert user_git_state(project) == before
    shadow = the_run()["shadow_commit"]
    files = set(git(project, "ls-tree", "-r", "--name-only", shadow).splitlines())
    assert files == {".gitignore", "train.py", "notes.md"}  # neither .flor/ nor the ignored debug.log
    assert git(project, "show", f"{shadow}:train.py") == "print('edited, not committed')"
    message = git(project, "log", "-1", "--format=%B", shadow)
    assert the_run()["run_id"] in message
    assert f"Flor-Head: {before[0]}" in message
    assert (project / ".flor" / ".gitignore").read_text().splitlines()[-1] == "*"


@pytest.mark.integration
def test_each_run_adds_one_commit_to_the_shadow_branch(project: Path) -> None:
    fit(max_epochs=1)
    (project / "train.py").write_text("print('second version')\n")
    fit(max_epochs=1)

    first, second = flor.runs()["shadow_commit"]
    assert git(project, "rev-list", SHADOW_BRANCH).split() == [second, first]
    assert git(project, "show", f"{second}:train.py") == "print('second version')"


@pytest.mark.integration
def test_recording_outside_git(no_git_project: Path) -> None:
    fit(max_epochs=1)

    run = the_run()
    assert run["status"] == "finished"
    assert run["shadow_commit"] is None
    assert run["head_commit"] is None
    assert run["branch"] is None
    assert run["script"] == "train.py"
    assert (no_git_project / ".flor" / "flor.db").is_file()
    assert len(values(flor.records(), "train_loss")) == TRAIN_BATCHES
    assert json.loads(rows(no_git_project / ".flor" / "flor.db", "SELECT settings FROM runs")[0]["settings"])


@pytest.mark.integration
def test_a_checkpoint_store_that_fails_mid_run_does_not_stop_training(project: Path, flor_home: Path) -> None:
    """The choice the README documents: training goes on, and the index stays consistent."""

    class BreakTheStore(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:  # checkpoints -1 and 0 are written by now
                flor_cb = next(cb for cb in trainer.callbacks if isinstance(cb, FlorCallback))
                flor_cb.session.checkpoints.wait()
                (run_dir,) = [
                    p for p in flor_home.rglob("*") if p.is_dir() and p.parent.parent == flor_home and p.name != "packs"
                ]
                run_dir.rename(run_dir.with_name("moved"))
                run_dir.write_text("a file where the run's folder was: every later write fails")

    fit(callbacks=[FlorCallback(), BreakTheStore()])
    assert the_run()["status"] == "finished"
    assert set(values(flor.records(), "train_loss_epoch", level="epoch")["epoch"]) == {0, 1, 2}
    indexed = rows(project / ".flor" / "flor.db", "SELECT epoch, path FROM checkpoints ORDER BY epoch")
    assert [c["epoch"] for c in indexed] == [-1, 0]
    moved = next(flor_home.rglob("moved"))
    assert sorted(p.name for p in moved.iterdir()) == ["epoch=00000.manifest", "initial.manifest"]


# ---- what recording costs, and the adaptive checkpoint period -------------------------------------


class SlowLocalFS(LocalFileSystem):
    """A local filesystem whose renames take 0.2 s: every checkpoint write outlasts a test epoch."""

    protocol = ("slowfile",)

    def mv(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.2)
        super().mv(*args, **kwargs)


@pytest.mark.integration
def test_stats_count_the_checkpoints_and_stay_readable_after_fit(project: Path, flor_home: Path) -> None:
    fsspec.register_implementation("slowfile", SlowLocalFS, clobber=True)
    callback = FlorCallback(checkpoint_dir=f"slowfile://{flor_home}")
    assert callback.stats == RecordStats()

    fit(callbacks=[callback])

    indexed = rows(project / ".flor" / "flor.db", "SELECT size FROM checkpoints")
    stats = callback.stats  # the run is closed by now
    assert stats.checkpoints_written == len(indexed) == EPOCHS + 1
    assert stats.checkpoint_bytes == sum(r["size"] for r in indexed)
    assert stats.writer_cpu_seconds > 0
    assert stats.snapshot_seconds > 0
    # each write outlasts an epoch, so the next snapshot (and the end of fit) waited for one
    assert stats.blocked_seconds > 0
    assert stats.checkpoint_every == 1


@pytest.mark.integration
def test_stats_time_each_step_of_recording(project: Path) -> None:
    callback = FlorCallback()
    start = time.perf_counter()
    fit(callbacks=[callback])
    fit_seconds = time.perf_counter() - start

    stats = callback.stats
    training_thread = {
        "state": stats.state_seconds,  # Lightning's checkpoint dict, once per checkpoint
        "rng": stats.rng_seconds,  # per checkpoint and per validation
        "snapshot": stats.snapshot_seconds,
        "store": stats.store_seconds,  # the run's row and one row per epoch
        "code": stats.code_seconds,  # the project is a git repository: its code is committed
        "blocked": stats.blocked_seconds,
    }
    assert all(seconds > 0 for name, seconds in training_thread.items() if name != "blocked"), training_thread
    # Each is a part of the fit, timed on the thread that ran it, and no two overlap.
    assert sum(training_thread.values()) < fit_seconds
    assert 0 < stats.log_writer_cpu_seconds < fit_seconds  # the writer thread stored every value


@pytest.mark.integration
@pytest.mark.parametrize(("budget", "expected"), [(1e-9, [-1, 4]), (1.0, [-1, 0, 1, 2, 3, 4])])
def test_auto_checkpoint_period_follows_the_budget(project: Path, budget: float, expected: list[int]) -> None:
    """A tiny budget leaves only the initial and last checkpoints; a whole epoch's allows all."""
    callback = FlorCallback(checkpoint_every="auto", checkpoint_budget=budget)

    fit(callbacks=[callback], max_epochs=5)

    indexed = rows(project / ".flor" / "flor.db", "SELECT epoch FROM checkpoints ORDER BY epoch")
    assert [r["epoch"] for r in indexed] == expected
    assert (callback.stats.checkpoint_every > 4) == (budget < 1)
    assert the_run()["status"] == "finished"


# ---- checkpoints inside an epoch -------------------------------------------------------------


class WeightsAtValidation(L.Callback):
    """The model's weights and the global step at the end of each validation inside fit (after flor's hook)."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def inside_rows(run_id: str) -> list[tuple[int, int, int]]:
    """(epoch, global step, batch index) of the run's checkpoints inside an epoch, in order."""
    got = rows(
        Path(".flor/flor.db"),
        "SELECT epoch, step, batch_idx FROM checkpoints WHERE run_id = ? AND batch_idx IS NOT NULL ORDER BY step",
        (run_id,),
    )
    return [(r["epoch"], r["step"], r["batch_idx"]) for r in got]


@pytest.mark.parametrize("interval", [3, 0.25])
def test_every_validation_point_inside_an_epoch_is_checkpointed_with_its_position(
    project: Path, capsys: pytest.CaptureFixture[str], interval: float
) -> None:
    """One epoch of 12 batches validating every 3 (or every quarter): the state after batches 3, 6 and 9
    is checkpointed as each validation ends (the one after batch 12 is the epoch end's checkpoint)."""
    spy = WeightsAtValidation()
    fit(callbacks=[FlorCallback(), spy], max_epochs=1, limit_train_batches=12, val_check_interval=interval)
    run_id = the_run()["run_id"]
    assert inside_rows(run_id) == [(0, 3, 2), (0, 6, 5), (0, 9, 8)]
    ends = rows(Path(".flor/flor.db"), "SELECT epoch FROM checkpoints WHERE batch_idx IS NULL ORDER BY epoch")
    assert [r["epoch"] for r in ends] == [-1, 0]
    for step, batch_idx in [(3, 2), (6, 5), (9, 8)]:
        [row] = rows(
            Path(".flor/flor.db"), "SELECT path FROM checkpoints WHERE step = ? AND batch_idx = ?", (step, batch_idx)
        )
        state = CheckpointStore(row["path"]).load(row["path"], None)  # the manifest, every blob verified
        mid = state["flor"]["mid_epoch"]
        assert (mid["epoch"], mid["global_step"], mid["batches"], mid["moment"]) == (
            0,
            step,
            batch_idx + 1,
            "validation_end",
        )
        assert mid["data_skip"] == "sampler" and state["flor"]["run_id"] == run_id
        assert set(state["state_dict"]) == set(spy.seen[step])
        assert all(torch.equal(state["state_dict"][k], v) for k, v in spy.seen[step].items())
    code = cli.main(["show", run_id])
    out = capsys.readouterr().out
    assert code == 0 and "epoch 0 step 3 batch 2" in out and "epoch 0 step 9 batch 8" in out


def test_checkpoint_every_n_steps_counts_optimizer_steps_across_gradient_accumulation(project: Path) -> None:
    """12 batches, 2 per optimizer step: every 2nd step is after batches 4 and 8 (step 6 ends the epoch)."""
    fit(
        callbacks=[FlorCallback(checkpoint_every_n_steps=2)],
        max_epochs=1,
        limit_train_batches=12,
        accumulate_grad_batches=2,
    )
    assert inside_rows(the_run()["run_id"]) == [(0, 2, 3), (0, 4, 7)]


def test_check_val_every_n_epoch_validates_at_epoch_ends_only_so_nothing_is_checkpointed_inside(project: Path) -> None:
    fit(max_epochs=2, check_val_every_n_epoch=2)
    assert inside_rows(the_run()["run_id"]) == []


class Ticks:
    """A clock that moves ``tick`` seconds at each reading."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1_000_000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.parametrize(("tick", "budget", "expected"), [(100.0, 1.0, [3, 6, 9]), (1e-9, 0.01, [])])
def test_auto_checkpoints_validation_points_inside_an_epoch_as_the_budget_allows(
    project: Path, tick: float, budget: float, expected: list[int]
) -> None:
    """Slow steps (100 s a clock reading) pay for a checkpoint at every validation point; steps that take
    next to no time pay for none inside the epoch (its start and end are checkpointed all the same)."""
    flor_cb = FlorCallback(checkpoint_every="auto", checkpoint_budget=budget, clock=Ticks(tick))
    fit(callbacks=[flor_cb], max_epochs=1, limit_train_batches=12, val_check_interval=3)
    assert [step for _, step, _ in inside_rows(the_run()["run_id"])] == expected
    assert flor_cb.stats.checkpoint_every_steps is not None
    assert (flor_cb.stats.checkpoint_every_steps == 1) == bool(expected)


def test_checkpoint_every_n_steps_must_be_a_whole_number() -> None:
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ConfigError, match="checkpoint_every_n_steps must be a whole number"):
            FlorCallback(checkpoint_every_n_steps=bad)  # type: ignore[arg-type]
