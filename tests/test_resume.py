"""Resuming a crashed run from its last complete checkpoint, in the same run's records."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import rows
from models import DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning._checkpoints import CheckpointStore

pytestmark = pytest.mark.integration


class Crash(L.Callback):
    """Kills training (an exception, as a failing node would) in epoch 2, batch 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            raise RuntimeError("simulated crash")


def fit(callbacks=(), ckpt_path=None, max_epochs=4):
    L.seed_everything(3)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=max_epochs, callbacks=list(callbacks)))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData(), ckpt_path=ckpt_path)
    return trainer.flor.run_id


def values(run_id):
    df = flor.records(run=run_id)
    return sorted(map(tuple, df.drop(columns=["run_id"]).astype(str).to_numpy()))


def test_resumed_run_equals_the_uninterrupted_one_without_duplicates(project):
    whole = fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(callbacks=[Crash()])
    crashed = flor.runs()["run_id"].iloc[-1]
    assert flor.runs()["status"].iloc[-1] == "failed"
    partial = flor.records(run=crashed)
    assert (partial["epoch"] == 2).any()  # epoch 2 had started logging before the crash

    path = flor.last_checkpoint(crashed)
    assert path.endswith("epoch=00001.manifest")  # Lightning reads it through flor's checkpoint IO
    resumed = fit(ckpt_path=path)
    assert resumed == crashed  # the same run goes on
    runs = flor.runs()
    assert len(runs) == 2 and runs["status"].iloc[-1] == "finished"
    # every value of the resumed run equals the uninterrupted run's, once (shuffle, dropout, Adam, StepLR)
    assert values(resumed) == values(whole)
    ckpts = rows(
        project / ".flor" / "flor.db", "SELECT epoch FROM checkpoints WHERE run_id = ? ORDER BY epoch", (resumed,)
    )
    assert [c["epoch"] for c in ckpts] == [-1, 0, 1, 2, 3]


def test_resumed_weights_equal_the_uninterrupted_ones(project):
    fit()
    whole = flor.last_checkpoint()
    with pytest.raises(RuntimeError):
        fit(callbacks=[Crash()])
    fit(ckpt_path=flor.last_checkpoint())
    a = CheckpointStore(whole).load(whole, None)["state_dict"]
    b = CheckpointStore(whole).load(flor.last_checkpoint(), None)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_last_checkpoint_errors(project):
    fit(max_epochs=1)
    with pytest.raises(flor.UnknownRunError, match="unknown run id 'nope'"):
        flor.last_checkpoint("nope")


class CrashInside(L.Callback):
    """Kills training (an exception) as batch 10 of the only epoch starts, after the validation points at 3, 6, 9."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 10:
            raise RuntimeError("simulated crash inside the epoch")


ONE_EPOCH = {"max_epochs": 1, "limit_train_batches": 12, "val_check_interval": 3}


def fit_one_epoch(callbacks=(), ckpt_path=None):
    L.seed_everything(3, workers=True)
    trainer = flor.Trainer(**trainer_kwargs(**ONE_EPOCH, callbacks=list(callbacks)))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData(), ckpt_path=ckpt_path)
    return trainer


def test_a_run_crashed_inside_its_only_epoch_resumes_from_its_last_validation_point(project):
    whole = fit_one_epoch().flor.run_id
    with pytest.raises(RuntimeError, match="simulated crash inside"):
        fit_one_epoch(callbacks=[CrashInside()])
    crashed = flor.runs()["run_id"].iloc[-1]
    partial = flor.records(run=crashed)
    assert (partial["batch_idx"] == 9).any()  # batch 9 logged before the crash, after the last checkpoint

    path = flor.last_checkpoint(crashed)
    assert path.endswith("epoch=00000-batch=0000008.manifest")  # after batch 9 (index 8) and its validation
    resumed = fit_one_epoch(ckpt_path=path)
    assert resumed.flor.run_id == crashed and flor.runs()["status"].iloc[-1] == "finished"
    # every value equals the uninterrupted run's, once: shuffled data, dropout, Adam
    assert values(crashed) == values(whole)
    db = project / ".flor" / "flor.db"
    ckpts = rows(db, "SELECT epoch, batch_idx FROM checkpoints WHERE run_id = ? ORDER BY epoch, step", (crashed,))
    assert [(c["epoch"], c["batch_idx"]) for c in ckpts] == [(-1, None), (0, 2), (0, 5), (0, 8), (0, None)]
    a = CheckpointStore(str(project)).load(flor.last_checkpoint(whole), None)["state_dict"]
    b = CheckpointStore(str(project)).load(flor.last_checkpoint(crashed), None)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
