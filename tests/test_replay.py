"""trainer.replay(): hindsight logging from memoized checkpoints, end to end with a real Trainer."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from types import ModuleType

import lightning as L
import pytest
from helpers import git, make_venv, rows
from models import VAL_BATCHES, trainer_kwargs

import flor_lightning as flor
from flor_lightning import _replay
from flor_lightning._checkpoints import CheckpointStore, split
from flor_lightning._errors import CheckpointError, ReplayError

pytestmark = pytest.mark.integration

# The model lives in the project repository, as a user's would, so the shadow branch holds it
# and replay can compare its training path with the recorded version.
MODEL_SOURCE = (Path(__file__).parent / "models.py").read_text()
_names = itertools.count()


def load_module(root: Path) -> ModuleType:
    """Import ``root/model.py`` afresh (as a new process running the edited script would)."""
    name = f"flor_test_model_{next(_names)}"
    spec = importlib.util.spec_from_file_location(name, root / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def edit(root: Path, old: str, new: str) -> ModuleType:
    path = root / "model.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return load_module(root)


@pytest.fixture
def recorded(project: Path) -> tuple[Path, str]:
    """A project whose model.py was recorded for 3 epochs; returns (root, run id)."""
    (project / "model.py").write_text(MODEL_SOURCE)
    git(project, "add", "model.py")
    git(project, "commit", "-q", "-m", "model")
    m = load_module(project)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs())
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    return project, trainer.flor.run_id


def replay(m: ModuleType, **kwargs) -> flor.ReplayReport:
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=kwargs.pop("max_epochs", 3), **kwargs.pop("trainer", {})))
    return trainer.replay(m.DigitsClassifier(**kwargs.pop("model", {})), datamodule=m.DigitsData(), **kwargs)


VAL_F1 = (
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())',
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())\n'
    '        self.log(f"{prefix}_conf", logits.softmax(1).max(1).values.mean())',
)
TRAIN_METRIC = (
    'self.log("train_loss", loss, on_step=True, on_epoch=True)',
    'self.log("train_loss", loss, on_step=True, on_epoch=True)\n        self.log("train_loss_x2", loss.detach() * 2)',
)


def test_validation_metric_is_replayed_from_checkpoints_on_the_recorded_rows(recorded):
    root, run_id = recorded
    before = flor.records(run=run_id)
    report = replay(edit(root, *VAL_F1))
    assert report.train is False and "unchanged" in report.reason
    assert report.epochs_restored == [0, 1, 2] and report.epochs_trained == []
    assert report.new_names == ["val_conf"]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    df = flor.query("val_loss", "val_conf", run=run_id)
    epoch_rows = df.dropna(subset=["val_loss"])
    assert len(epoch_rows) == 3 and epoch_rows["val_conf"].notna().all()
    assert list(epoch_rows["step"]) == [4, 8, 12]  # the recorded global steps, not 0
    after = flor.records(run=run_id)
    recorded_after = after[after["replay_id"].isna()].drop(columns="replay_id").reset_index(drop=True)
    assert recorded_after.equals(before.drop(columns="replay_id"))  # recorded values untouched
    stored = rows(root / ".flor" / "flor.db", "SELECT status, report FROM replays")
    assert stored[0]["status"] == "finished" and '"matched"' in stored[0]["report"]


def test_training_metric_re_trains_every_epoch_bit_for_bit(recorded):
    root, run_id = recorded
    report = replay(edit(root, *TRAIN_METRIC))
    assert report.train is True and "DigitsClassifier.training_step" in report.reason
    assert report.epochs_trained == [0, 1, 2] and report.epochs_restored == []
    assert report.new_names == ["train_loss_x2"]
    # every recorded step value (shuffle=True, dropout, Adam, StepLR) is re-derived bit for bit
    assert report.rederived >= 3 * 4 + 3 * 2 and report.mismatched == 0 and report.matched == report.rederived
    df = flor.query("train_loss", "train_loss_x2", run=run_id).dropna(subset=["train_loss"])
    assert (df["train_loss_x2"] == df["train_loss"] * 2).all()


def test_train_false_restores_even_when_the_training_path_changed(recorded):
    root, _ = recorded
    report = replay(edit(root, *TRAIN_METRIC), train=False)
    assert report.train is False and report.epochs_restored == [0, 1, 2]
    assert "train_loss_x2" not in report.new_names


def test_selected_epochs_only(recorded):
    root, run_id = recorded
    report = replay(edit(root, *VAL_F1), epochs=range(1, 3))
    assert report.epochs_restored == [1, 2]
    df = flor.query("val_conf", run=run_id).dropna(subset=["val_conf"])
    assert sorted(set(df["epoch"])) == [1, 2]


def test_segments_in_one_process_store_the_same_values(recorded):
    root, run_id = recorded
    m = edit(root, *VAL_F1)
    one = replay(m)
    two = replay(m, segments=2)
    recs = flor.records("val_conf", run=run_id)
    by_replay = {r: g.drop(columns="replay_id").reset_index(drop=True) for r, g in recs.groupby("replay_id")}
    assert by_replay[one.replay_id].equals(by_replay[two.replay_id])
    only_second = replay(m, segments=2, segment=1)
    assert only_second.epochs_restored == [2] or only_second.epochs_restored == [1, 2]


def replay_with(trainer: L.Trainer, m: ModuleType, **kwargs) -> flor.ReplayReport:
    """The replay a plain Trainer gets (as the version runner gives a recorded script's ``fit``)."""
    args = {"run": None, "epochs": None, "segments": 1, "segment": None, "train": None, **kwargs}
    data = {"datamodule": m.DigitsData(), "train_dataloaders": None, "val_dataloaders": None}
    return _replay.run_replay(trainer, m.DigitsClassifier(), **data, **args)


def test_a_plain_trainer_with_a_florcallback_replays_as_flor_trainer_does(recorded):
    root, run_id = recorded
    m = edit(root, *VAL_F1)
    L.seed_everything(7)
    mine = flor.FlorCallback()
    report = replay_with(L.Trainer(**trainer_kwargs(), callbacks=[mine]), m)
    assert report.run_id == run_id and report.epochs_restored == [0, 1, 2] and report.new_names == ["val_conf"]
    assert report.rederived > 0 and report.matched == report.rederived
    assert mine.replay_id is None and not mine.capture.muted  # given back as it was


def test_the_replay_s_times_come_from_the_clock_it_is_given(recorded):
    root, _ = recorded
    m = edit(root, *VAL_F1)
    ticks = itertools.count(1_000_000)
    L.seed_everything(7)
    report = replay_with(flor.Trainer(**trainer_kwargs()), m, clock=lambda: float(next(ticks)))
    db = root / ".flor" / "flor.db"
    [rep] = rows(db, "SELECT started, ended FROM replays")
    [seg] = rows(db, "SELECT started, ended FROM replay_segments")
    times = [rep["started"], seg["started"], seg["ended"], rep["ended"]]
    assert rep["started"] == 1_000_000 and times == sorted(times) and all(t < 1_000_100 for t in times)
    assert report.seconds == int(report.seconds) and 0 < report.seconds < rep["ended"] - rep["started"]


def test_sparse_checkpoints_train_forward_from_the_nearest_earlier_one(project):
    (project / "model.py").write_text(MODEL_SOURCE)
    m = load_module(project)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(callbacks=[flor.FlorCallback(checkpoint_every=2)]))
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    epochs = [r["epoch"] for r in rows(project / ".flor" / "flor.db", "SELECT epoch FROM checkpoints ORDER BY epoch")]
    assert epochs == [-1, 1, 2]
    report = replay(edit(project, *VAL_F1), trainer={"callbacks": [flor.FlorCallback(checkpoint_every=2)]})
    assert report.epochs_trained == [0] and report.epochs_restored == [1, 2]
    assert report.mismatched == 0 and report.matched == report.rederived


def test_a_later_fit_on_the_same_trainer_behaves_normally(recorded):
    root, _ = recorded
    m = edit(root, *VAL_F1)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs())
    trainer.replay(m.DigitsClassifier(), datamodule=m.DigitsData())
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    assert trainer.current_epoch == 3
    runs = flor.runs()
    assert len(runs) == 2 and list(runs["status"]) == ["finished", "finished"]
    new = flor.records(run=runs["run_id"].iloc[-1])
    assert set(new[new["stage"] == "train"]["epoch"]) == {0, 1, 2}


def test_corrupt_checkpoint_is_named_and_worked_around(recorded):
    root, _run_id = recorded
    path = Path(rows(root / ".flor" / "flor.db", "SELECT path FROM checkpoints WHERE epoch = 1")[0]["path"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = replay(edit(root, *VAL_F1))
    assert report.bad_checkpoints == [1]
    assert report.epochs_restored == [0, 2] and report.epochs_trained == [1]
    assert report.mismatched == 0 and report.matched == report.rederived


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_blob_is_named_and_replay_re_plans_from_an_earlier_checkpoint(recorded, damage):
    root, run_id = recorded
    ckpts = {r["epoch"]: r for r in rows(root / ".flor" / "flor.db", "SELECT * FROM checkpoints")}
    store = CheckpointStore(ckpts[1]["path"])
    manifest = store.blobs.read_manifest(split(ckpts[1]["path"])[1], resolve=lambda _: ckpts[1]["path"])
    (pack,) = {r.pack for r in manifest.tensors} - set(json.loads(ckpts[0]["packs"]))  # epoch 1's new blobs
    assert pack not in json.loads(ckpts[2]["packs"])  # every tensor it holds changed again in epoch 2
    path = Path(ckpts[1]["path"]).parent.parent / pack
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF  # the last blob's bytes
        path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"epoch 1 is unusable \(checkpoint '{run_id}/epoch=00001.manifest': tensor"):
        report = replay(edit(root, *VAL_F1))
    assert report.bad_checkpoints == [1]
    assert report.epochs_restored == [0, 2] and report.epochs_trained == [1]
    assert report.mismatched == 0 and report.matched == report.rederived


def test_changed_model_shape_is_a_clear_error(recorded):
    root, _ = recorded
    with pytest.raises(CheckpointError, match="does not fit the model"):
        replay(load_module(root), model={"hidden": 48})


def test_different_data_length_is_refused_when_re_training(recorded):
    root, _ = recorded
    with pytest.raises(ReplayError, match="batches per epoch but the recording had 4"):
        replay(load_module(root), train=True, trainer={"limit_train_batches": 3})


def test_an_unknown_run_is_named_with_the_latest_runs(recorded):
    root, run_id = recorded
    with pytest.raises(flor.UnknownRunError, match=rf"unknown run id 'nope'; the latest runs are \['{run_id}'\]"):
        replay(load_module(root), run="nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": [5]}, r"epochs \[5\] were not recorded; recorded epochs: 0-2"),
        ({"segments": 0}, "segments must be a whole number"),
        ({"segments": 4}, "segments must be between 1 and the number of epochs"),
        ({"segments": 2, "segment": 2}, "segment must be a whole number in 0..1"),
        ({"train": "yes"}, "train must be None"),
    ],
)
def test_bad_arguments(recorded, kwargs, message):
    root, _ = recorded
    with pytest.raises(ReplayError, match=message):
        replay(load_module(root), **kwargs)


def test_replay_before_any_recording(project):
    (project / "model.py").write_text(MODEL_SOURCE)
    with pytest.raises(ReplayError, match="nothing to replay"):
        replay(load_module(project))


def test_a_run_recorded_with_an_adaptive_period_replays_exactly(project):
    """checkpoint_every="auto" on a tiny budget keeps only -1 and the last: replay trains across the gap."""
    (project / "model.py").write_text(MODEL_SOURCE)
    m = load_module(project)
    L.seed_everything(7)
    auto = flor.FlorCallback(checkpoint_every="auto", checkpoint_budget=1e-9)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=4, callbacks=[auto]))
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    epochs = [r["epoch"] for r in rows(project / ".flor" / "flor.db", "SELECT epoch FROM checkpoints ORDER BY epoch")]
    assert epochs == [-1, 3]
    report = replay(edit(project, *VAL_F1), max_epochs=4)
    assert report.epochs_restored == [3] and report.epochs_trained == [0, 1, 2]
    assert report.mismatched == 0 and report.matched == report.rederived > 0


# ---- a virtualenv inside the project, user callbacks with library-like names ------------------

VENV_MODEL = """
import digits_lib  # installed in the project's own .venv, as Lightning itself is


class DigitsClassifier(digits_lib.DigitsClassifier):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)


DigitsData = digits_lib.DigitsData
"""


@pytest.fixture
def venv_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with ``.venv/`` inside it (ignored), its model's base class from that venv's site-packages;
    recorded for 3 epochs."""
    site = make_venv(project / ".venv")
    (site / "digits_lib.py").write_text(MODEL_SOURCE)
    spec = importlib.util.spec_from_file_location("digits_lib", site / "digits_lib.py")
    assert spec and spec.loader
    library = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "digits_lib", library)
    spec.loader.exec_module(library)
    (project / ".gitignore").write_text("*.log\n.venv/\n")
    (project / "model.py").write_text(VENV_MODEL)
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "model on a library base class")
    m = load_module(project)
    L.seed_everything(7)
    flor.Trainer(**trainer_kwargs()).fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    return project


def test_library_methods_from_a_venv_inside_the_project_do_not_force_re_training(venv_project):
    m = edit(
        venv_project,
        "super().validation_step(batch, batch_idx)",
        'super().validation_step(batch, batch_idx)\n        self.log("val_extra", 1.0)',
    )
    report = replay(m)
    assert report.train is False, report.reason
    assert report.epochs_restored == [0, 1, 2] and report.new_names == ["val_extra"]
    assert report.mismatched == 0 and report.matched == report.rederived > 0


def test_a_training_path_change_over_a_venv_base_class_still_re_trains(venv_project):
    override = (
        "    def training_step(self, batch, batch_idx):\n"
        "        loss = super().training_step(batch, batch_idx)\n"
        '        self.log("train_x2", loss.detach() * 2)\n'
        "        return loss\n\n"
        "    def validation_step"
    )
    report = replay(edit(venv_project, "    def validation_step", override))
    assert report.train is True and report.reason.endswith("DigitsClassifier.training_step")
    assert report.epochs_trained == [0, 1, 2] and report.new_names == ["train_x2"]
    assert report.mismatched == 0 and report.matched == report.rederived > 0


USER_CALLBACK = """
import lightning as L


class BatchProbe(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass
"""


def test_a_user_callback_in_a_module_named_lightning_something_is_the_users(recorded, monkeypatch):
    root, _ = recorded
    (root / "lightning_utils.py").write_text(USER_CALLBACK.replace("pass", 'pl_module.log("batch_seen", 1.0)'))
    spec = importlib.util.spec_from_file_location("lightning_utils", root / "lightning_utils.py")
    assert spec and spec.loader
    utils = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lightning_utils", utils)
    spec.loader.exec_module(utils)
    # the recording had no such file: its training-path hook is new, so the epochs must be trained again
    report = replay(load_module(root), trainer={"callbacks": [utils.BatchProbe()]})
    assert report.train is True and "BatchProbe.on_train_batch_end" in report.reason
    assert report.new_names == ["batch_seen"]


MAXPROB = (
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())',
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())\n'
    '        self.log(f"{prefix}_maxprob", logits.softmax(1).max(1).values.mean())',
)
MAXPROB_PERCENT = (
    'self.log(f"{prefix}_maxprob", logits.softmax(1).max(1).values.mean())',
    'self.log(f"{prefix}_maxprob", 100 * logits.softmax(1).max(1).values.mean())',
)


class StopAtEpoch(L.Callback):
    """Raises at the end of one epoch, as a user's callback (or Ctrl-C) stops a replay midway."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"stopped at epoch {self.epoch}")


def test_a_failed_replay_never_mixes_into_query_and_a_re_run_replaces_it(project):
    """Record 4 epochs; replay a new metric; change its formula and replay again, failing in epoch 2;
    query shows only the finished replay's values; re-running the failed one replaces its values."""
    (project / "model.py").write_text(MODEL_SOURCE)
    m = load_module(project)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=4))
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    run_id = trainer.flor.run_id
    db = project / ".flor" / "flor.db"

    first = replay(edit(project, *MAXPROB), max_epochs=4)
    assert first.new_names == ["val_maxprob"] and first.status == "finished"
    percent = edit(project, *MAXPROB_PERCENT)
    with pytest.raises(RuntimeError, match="stopped at epoch 2"):
        replay(percent, max_epochs=4, trainer={"callbacks": [StopAtEpoch(2)]})
    (failed,) = rows(db, "SELECT * FROM replays WHERE status = 'failed'")
    stored = json.loads(failed["report"])
    assert stored["status"] == "failed" and "RuntimeError: stopped at epoch 2" in stored["error"]
    assert stored["epochs_restored"] == [0, 1]  # what it finished before it failed
    # epochs 0-2 were validated: each batch's value and the epoch's
    assert stored["new_names"] == ["val_maxprob"] and stored["new_values"] == 3 * (VAL_BATCHES + 1)
    assert stored["rederived"] > 0 and stored["matched"] == stored["rederived"]

    shown = flor.query("val_maxprob", run=run_id).dropna(subset=["val_maxprob"])
    assert len(shown) == 4 and (shown["val_maxprob"] < 1).all()  # the finished replay's formula, every epoch
    mixed = flor.query("val_maxprob", run=run_id, unfinished=True).dropna(subset=["val_maxprob"])
    assert (mixed["val_maxprob"] > 1).tolist() == [True, True, True, False]  # what the option shows
    rec = flor.records("val_maxprob", run=run_id, unfinished=True)
    assert rec.groupby("replay_status")["epoch"].apply(lambda e: sorted(set(e))).to_dict() == {
        "failed": [0, 1, 2],
        "finished": [0, 1, 2, 3],
    }
    assert set(flor.records(run=run_id)["replay_status"].dropna()) == {"finished"}

    again = replay(percent, max_epochs=4)
    assert again.status == "finished" and again.replaced_replays == [failed["replay_id"]]
    left = rows(db, "SELECT count(*) AS n FROM logs WHERE replay_id = ?", (failed["replay_id"],))[0]["n"]
    assert left == 0 and again.replaced_values == stored["new_values"] + stored["rederived"]
    shown = flor.query("val_maxprob", run=run_id).dropna(subset=["val_maxprob"])
    assert len(shown) == 4 and (shown["val_maxprob"] > 1).all()  # the latest finished replay's formula
    rec = flor.records("val_maxprob", run=run_id, unfinished=True)
    assert rec["replay_id"].value_counts().to_dict() == {first.replay_id: 12, again.replay_id: 12}


def record_validating_inside(project, max_epochs, **settings):
    """Record model.py for ``max_epochs`` with ``settings`` (validating inside its epochs); returns the run id."""
    (project / "model.py").write_text(MODEL_SOURCE)
    git(project, "add", "model.py")
    git(project, "commit", "-q", "-m", "model")
    m = load_module(project)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=max_epochs, **settings))
    trainer.fit(m.DigitsClassifier(), datamodule=m.DigitsData())
    return trainer.flor.run_id


ONE_EPOCH = {"limit_train_batches": 12, "val_check_interval": 3}


def test_a_validation_metric_is_replayed_at_each_validation_point_inside_the_epoch(project):
    """One epoch of 12 batches validating every 3: each validation point is restored from its checkpoint
    and validated, no training batch runs, and the new values land on the recorded validation rows."""
    run_id = record_validating_inside(project, 1, **ONE_EPOCH)
    report = replay(edit(project, *VAL_F1), max_epochs=1, trainer=ONE_EPOCH)
    assert report.train is False and report.epochs_restored == [0] and report.epochs_trained == []
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    df = flor.query("val_loss", "val_conf", run=run_id)
    at_points = df.dropna(subset=["val_loss"])
    assert list(at_points["step"]) == [3, 6, 9, 12] and at_points["val_conf"].notna().all()
    assert (at_points["epoch"] == 0).all()
    trained = flor.records(run=run_id)
    replayed = trained[trained["replay_id"].notna()]
    assert set(replayed["stage"]) == {"validate"}  # no training batch ran


def test_a_float_interval_and_check_val_every_n_epoch_2_replay_their_validation_points(project):
    settings = {"val_check_interval": 0.5, "check_val_every_n_epoch": 2}
    run_id = record_validating_inside(project, 2, **settings)
    inside = rows(project / ".flor" / "flor.db", "SELECT epoch, batch_idx FROM checkpoints WHERE batch_idx >= 0")
    assert [(r["epoch"], r["batch_idx"]) for r in inside] == [(1, 1)]  # epoch 0 did not validate
    report = replay(edit(project, *VAL_F1), max_epochs=2, trainer=settings)
    assert report.train is False and report.epochs_restored == [0, 1]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    df = flor.query("val_loss", "val_conf", run=run_id).dropna(subset=["val_loss"])
    assert list(df["step"]) == [6, 8] and df["val_conf"].notna().all()


def test_a_run_without_checkpoints_at_its_validation_points_re_trains_as_before(project):
    """As a recording made before checkpoints inside an epoch existed: replay re-trains it, exactly."""
    run_id = record_validating_inside(project, 1, **ONE_EPOCH)
    with closing(sqlite3.connect(project / ".flor" / "flor.db")) as c, c:
        c.execute("DELETE FROM checkpoints WHERE batch_idx IS NOT NULL")
    report = replay(edit(project, *VAL_F1), max_epochs=1, trainer=ONE_EPOCH)
    assert report.train is True and "validated at step 3, where it has no checkpoint" in report.reason
    assert report.epochs_trained == [0]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    assert flor.query("val_conf", run=run_id)["val_conf"].notna().sum() == 4


def test_a_training_metric_re_trains_an_epoch_that_validated_inside_bit_for_bit(project):
    record_validating_inside(project, 1, **ONE_EPOCH)
    report = replay(edit(project, *TRAIN_METRIC), max_epochs=1, trainer=ONE_EPOCH)
    assert report.train is True and report.epochs_trained == [0]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0


class BatchCounter(L.Callback):
    """The (epoch, batch index) of every training batch a fit runs."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx))


def replayed_rows(run_id):
    df = flor.records(run=run_id)
    return df[df["replay_id"].notna()]


@pytest.mark.parametrize(
    ("steps", "start", "trained", "epoch_end"),
    [
        (range(7, 13), "after batch 5 (step 6)", range(6, 12), True),
        (range(4, 9), "after batch 2 (step 3)", range(3, 9), False),
    ],
)
def test_a_step_slice_re_trains_from_the_checkpoint_inside_the_epoch_before_it_bit_for_bit(
    project, steps, start, trained, epoch_end
):
    """One epoch of 12 shuffled batches with dropout, checkpointed at its validation points (steps 3, 6, 9):
    a training metric replayed for a slice of steps re-trains from the checkpoint before the slice, only the
    batches up to its end, and stores only the values at its steps, on the recorded rows, re-derived exactly."""
    run_id = record_validating_inside(project, 1, **ONE_EPOCH)
    counter = BatchCounter()
    report = replay(
        edit(project, *TRAIN_METRIC), max_epochs=1, steps=steps, trainer={**ONE_EPOCH, "callbacks": [counter]}
    )
    assert report.train is True and report.epochs_trained == [0]
    assert report.notes == [f"training starts from the checkpoint inside epoch 0 {start}"]
    assert counter.batches == [(0, b) for b in trained]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    rows_ = replayed_rows(run_id)
    assert set(rows_["step"]) == set(steps) and (rows_["epoch"] == 0).all()
    new = rows_[rows_["name"] == "train_loss_x2"]
    assert sorted(new["batch_idx"]) == [b for b in trained if b in steps]  # batch b starts at step b
    df = flor.query("train_loss", "train_loss_x2", run=run_id).dropna(subset=["train_loss_x2"])
    assert list(df["step"]) == [b for b in trained if b in steps]
    assert (df["train_loss_x2"] == 2 * df["train_loss"]).all()  # the new value beside the recorded one
    aggregates = rows_[rows_["name"] == "train_loss_epoch"]
    assert len(aggregates) == int(epoch_end)  # re-derived from the aggregates restored with the checkpoint


def test_a_step_slice_re_trains_across_gradients_accumulated_over_its_checkpoint(project):
    """With accumulate_grad_batches=2 the validation after batch 2 (a checkpoint at step 1) falls between the two
    batches of an optimizer step: the replay resumes with batch 2's gradients and re-derives exactly."""
    settings = {**ONE_EPOCH, "accumulate_grad_batches": 2}
    run_id = record_validating_inside(project, 1, **settings)
    counter = BatchCounter()
    report = replay(
        edit(project, *TRAIN_METRIC), max_epochs=1, steps=range(2, 7), trainer={**settings, "callbacks": [counter]}
    )
    assert report.notes == ["training starts from the checkpoint inside epoch 0 after batch 2 (step 1)"]
    assert counter.batches == [(0, b) for b in range(3, 12)]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    rows_ = replayed_rows(run_id)
    assert set(rows_["step"]) == {2, 3, 4, 5, 6}
    assert sorted(rows_[rows_["name"] == "train_loss_x2"]["batch_idx"]) == list(range(4, 12))


def test_steps_must_be_a_range_of_recorded_steps(project):
    record_validating_inside(project, 1, **ONE_EPOCH)
    m = load_module(project)
    with pytest.raises(ReplayError, match="steps must be a non-empty range of global steps"):
        replay(m, max_epochs=1, steps=[3, 4], trainer=ONE_EPOCH)
    with pytest.raises(ReplayError, match="give epochs= or steps=, not both"):
        replay(m, max_epochs=1, steps=range(3, 4), epochs=[0], trainer=ONE_EPOCH)
    with pytest.raises(ReplayError, match=r"steps 40-49 were not recorded; the run logged values at global steps 0-12"):
        replay(m, max_epochs=1, steps=range(40, 50), trainer=ONE_EPOCH)


STREAM_DATA = '''

class StreamData(DigitsData):
    """The digits as an IterableDataset in a random order, with no state_dict: no position inside an epoch."""

    def train_dataloader(self):
        return DataLoader(_Stream(self.train_set), batch_size=32)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for i in torch.randperm(len(self.dataset)).tolist():
            yield self.dataset[i]
'''


def test_a_step_slice_of_an_unstateful_iterable_dataset_re_trains_from_the_epoch_start_and_says_so(project, caplog):
    """Its position inside the epoch cannot be restored: the replay says so before it starts and in its report,
    and re-trains from the epoch's start instead of refusing; still exact."""
    (project / "model.py").write_text(MODEL_SOURCE + STREAM_DATA)
    git(project, "add", "model.py")
    git(project, "commit", "-q", "-m", "model")
    m = load_module(project)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=1, **ONE_EPOCH))
    trainer.fit(m.DigitsClassifier(), datamodule=m.StreamData())
    run_id = trainer.flor.run_id
    m = edit(project, *TRAIN_METRIC)
    counter = BatchCounter()
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=1, **ONE_EPOCH, callbacks=[counter]))
    with caplog.at_level(logging.INFO):
        report = trainer.replay(m.DigitsClassifier(), datamodule=m.StreamData(), steps=range(7, 13))
    why = (
        "training starts at the epoch's start, not from the checkpoint inside epoch 0 after batch 5 (step 6), which "
        "is not exact: the training data is an IterableDataset without state_dict/load_state_dict"
    )
    assert len(report.notes) == 1 and report.notes[0].startswith(why)
    announced = next(r.getMessage() for r in caplog.records if "replaying run" in r.getMessage())
    assert why in announced and why in str(report)
    assert counter.batches == [(0, b) for b in range(12)]
    assert report.rederived > 0 and report.matched == report.rederived and report.mismatched == 0
    assert set(replayed_rows(run_id)["step"]) == set(range(7, 13))


def replay_values(project, replay_ids):
    """The values the replays stored, keyed by where they were logged (a key twice fails)."""
    db = project / ".flor" / "flor.db"
    marks = ",".join("?" * len(replay_ids))
    found = rows(
        db,
        f"SELECT stage, level, epoch, step, batch_idx, name, value FROM logs WHERE replay_id IN ({marks})",
        tuple(replay_ids),
    )
    keyed = {tuple(r[k] for k in ("stage", "level", "epoch", "step", "batch_idx", "name")): r["value"] for r in found}
    assert len(keyed) == len(found), "a value was stored twice"
    return keyed


@pytest.mark.parametrize(("change", "trains"), [(VAL_F1, False), (TRAIN_METRIC, True)])
def test_one_epoch_replayed_in_two_segments_equals_the_one_segment_replay_bit_for_bit(project, change, trains):
    """A one-epoch run's validation points (restore) or stretches between its checkpoints inside (re-train) are
    divided into 2 segments balanced by recorded time, each from the checkpoint before it: segment=0 and
    segment=1 replayed apart, and segments=2 in one process, store every value of the one-segment replay
    exactly once, bit for bit."""
    run_id = record_validating_inside(project, 1, **ONE_EPOCH)
    m = edit(project, *change)
    whole = replay(m, max_epochs=1, trainer=ONE_EPOCH)
    assert whole.train is trains and whole.mismatched == 0
    expected = replay_values(project, [whole.replay_id])
    parts, counted = [], []
    for i in (0, 1):
        counter = BatchCounter()
        parts.append(replay(m, max_epochs=1, segments=2, segment=i, trainer={**ONE_EPOCH, "callbacks": [counter]}))
        counted.append(counter.batches)
    if trains:  # divided after batch 2, 5 or 8 (by the recorded time, which varies): each batch runs once
        cut = len(counted[0])
        assert cut in (3, 6, 9) and counted == [[(0, b) for b in range(cut)], [(0, b) for b in range(cut, 12)]]
    else:
        assert counted == [[], []]
    assert all(p.train is trains and p.rederived > 0 and p.mismatched == 0 for p in parts)
    assert replay_values(project, [p.replay_id for p in parts]) == expected
    both = replay(m, max_epochs=1, segments=2, trainer=ONE_EPOCH)
    assert both.mismatched == 0 and replay_values(project, [both.replay_id]) == expected
    new = "val_conf" if not trains else "train_loss_x2"
    level = "step" if trains else "epoch"  # train_loss_x2 per training batch, val_conf per validation point
    assert sum(k[5] == new and k[1] == level for k in expected) == (12 if trains else 4)
    assert flor.query(new, run=run_id)[new].notna().sum() == (4 if not trains else 12)


def test_an_epoch_whose_checkpoint_before_is_missing_is_reached_from_the_checkpoint_inside_the_epoch_before(project):
    """Epoch 1's end checkpoint is gone (as checkpoint_every="auto" may skip it): re-training epoch 2 starts
    from the checkpoint inside epoch 1 (after its batch 1), not from epoch 0's end; exactly."""
    settings = {"val_check_interval": 0.5}
    run_id = record_validating_inside(project, 3, **settings)
    with closing(sqlite3.connect(project / ".flor" / "flor.db")) as c, c:
        c.execute("DELETE FROM checkpoints WHERE epoch = 1 AND batch_idx IS NULL")
    counter = BatchCounter()
    report = replay(edit(project, *TRAIN_METRIC), epochs=[2], trainer={**settings, "callbacks": [counter]})
    assert report.notes == ["training starts from the checkpoint inside epoch 1 after batch 1 (step 6)"]
    assert counter.batches == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert report.epochs_trained == [1, 2] and report.mismatched == 0 and report.matched == report.rederived > 0
    assert set(replayed_rows(run_id)["epoch"]) == {2}  # epoch 1 was trained only to reach epoch 2


def test_a_new_epoch_aggregate_is_not_stored_by_a_step_slice_that_starts_inside_the_epoch(project):
    """The checkpoint inside the epoch holds no aggregate of a metric the recording did not log: from there the
    aggregate would cover batches 6-11 only, so it is left out with a warning; the recorded ones are re-derived."""
    run_id = record_validating_inside(project, 1, **ONE_EPOCH)
    m = edit(
        project, TRAIN_METRIC[0], TRAIN_METRIC[1].replace("loss.detach() * 2)", "loss.detach() * 2, on_epoch=True)")
    )
    with pytest.warns(UserWarning, match="train_loss_x2_epoch of epoch 0 not stored"):
        report = replay(m, max_epochs=1, steps=range(7, 13), trainer=ONE_EPOCH)
    assert report.mismatched == 0 and report.matched == report.rederived > 0
    names = set(replayed_rows(run_id)["name"])
    assert "train_loss_epoch" in names and "train_loss_x2_step" not in names
    assert "train_loss_x2" in names and "train_loss_x2_epoch" not in names
