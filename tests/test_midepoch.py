"""Restarting inside an epoch continues the recorded trajectory bit for bit (flor_lightning._midepoch and
the mid-epoch part of flor_lightning._lightning).

Each integration test runs the digits model uninterrupted, then again with captures, interrupted
after one, then resumed from it in a fresh Trainer and model; every value the resumed run logs
(each ``self.log`` call and each epoch aggregate, training and validation) and its final state
(weights, optimizer, schedulers, RNG) must equal the uninterrupted run's from that point on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from midepoch_runs import (
    AccuracyClassifier,
    Captures,
    Data,
    GroupSyncedClassifier,
    Interrupted,
    NoisyEpochStart,
    PlateauClassifier,
    SegmentLoop,
    StopAt,
    ValueLog,
    assert_same_state,
    assert_same_values,
    run,
)
from models import DigitsClassifier

from flor_lightning import _lightning
from flor_lightning._errors import CheckpointError
from flor_lightning._midepoch import EpochRngTracker, LoaderFacts, capture_refusal, data_skip
from flor_lightning._planner import EpochStep

NOT_RESUMABLE = _lightning.NOT_RESUMABLE_WARNING

# one epoch of 45 batches, stopped by max_steps inside it, validating every 4 batches: points after 4, 8, 12
ONE_EPOCH = {"max_steps": 14, "limit_train_batches": None, "val_check_interval": 4}


def interrupted_and_resumed(
    tmp_path: Path, stop: tuple[int, int], *, pick: int = -1, captures: dict[str, Any] | None = None, **kw: Any
) -> tuple[ValueLog, ValueLog, Captures, Captures]:
    """The uninterrupted run, then a run interrupted as batch ``stop`` = (epoch, index) starts and resumed
    from its capture number ``pick``. Returns the two value logs (full, resumed) and both Captures."""
    full = ValueLog()
    run([full], **kw)
    first, part = tmp_path / "first", ValueLog()
    first.mkdir()
    caps = Captures(first, part, **(captures or {}))
    with pytest.raises(Interrupted):
        run([part, caps, StopAt(*stop)], **kw)
    assert caps.saved, f"no capture was taken: {caps.refused}"
    assert_same_values(full.values[: len(part.values)], part.values)  # the same run, up to the interruption
    second, resumed = tmp_path / "second", ValueLog()
    second.mkdir()
    again = Captures(second, resumed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run([resumed, again], ckpt_path=caps.saved[pick].path, **kw)
    again.warnings = [str(w.message) for w in caught]
    return full, resumed, caps, again


# ---- the plain-data decisions (no Trainer) ------------------------------------------------------------


def test_the_tracker_keeps_the_states_before_each_epochs_iterator_and_at_its_first_batch() -> None:
    tracker = EpochRngTracker()
    tracker.fit_started({"at": "fit start"})
    assert tracker.data_rng(0) is None
    tracker.epoch_started(0, {"at": "epoch 0 start"})
    assert tracker.data_rng(0) is None  # no batch yet
    tracker.batch_started(0, {"at": "epoch 0 batch 0"})
    tracker.batch_started(0, {"at": "epoch 0 batch 1"})
    # the first epoch of a fit: Lightning made its iterator in setup_data, before on_train_start
    assert tracker.data_rng(0) == {
        "epoch": 0,
        "before_iterator": {"at": "fit start"},
        "first_batch": {"at": "epoch 0 batch 0"},
    }
    tracker.epoch_started(1, {"at": "epoch 1 start"})
    tracker.batch_started(1, {"at": "epoch 1 batch 0"})
    assert tracker.data_rng(0) is None
    assert tracker.data_rng(1) == {
        "epoch": 1,
        "before_iterator": {"at": "epoch 1 start"},
        "first_batch": {"at": "epoch 1 batch 0"},
    }


def test_the_tracker_carries_the_states_of_an_epoch_a_fit_resumed_inside() -> None:
    tracker = EpochRngTracker()
    tracker.fit_started({"at": "fit start"})
    recorded = {"epoch": 3, "before_iterator": {"at": "recorded start"}, "first_batch": {"at": "recorded batch 0"}}
    tracker.resumed(recorded)  # no epoch-start hook runs for the resumed epoch, and its first batch is long past
    tracker.batch_started(3, {"at": "a later batch"})
    assert tracker.data_rng(3) == recorded
    tracker.epoch_started(4, {"at": "epoch 4 start"})  # made after the epoch hooks, not at fit start
    tracker.batch_started(4, {"at": "epoch 4 batch 0"})
    assert tracker.data_rng(4) == {
        "epoch": 4,
        "before_iterator": {"at": "epoch 4 start"},
        "first_batch": {"at": "epoch 4 batch 0"},
    }


@pytest.mark.parametrize(
    ("loaders", "kwargs", "expected"),
    [
        ([LoaderFacts(False, False, 0, False)], {}, "sampler"),
        ([LoaderFacts(False, False, 2, False)], {}, "fetch"),
        ([LoaderFacts(False, False, 0, False), LoaderFacts(False, False, 0, False)], {}, "fetch"),
        ([LoaderFacts(True, True, 2, True)], {}, "stateful"),
        ([LoaderFacts(False, True, 0, False), LoaderFacts(False, False, 0, False)], {}, "some training loaders"),
        ([LoaderFacts(True, False, 0, False)], {}, "IterableDataset without state_dict"),
        ([LoaderFacts(False, False, 2, True)], {}, "persistent_workers=True"),
        ([LoaderFacts(False, False, 0, True)], {}, "sampler"),  # no workers to persist
        ([LoaderFacts(False, False, 0, False)], {"sized": False}, "has no length"),
        ([LoaderFacts(False, True, 0, False)], {"dataloader_iter": True}, "takes the dataloader iterator"),
    ],
)
def test_how_the_data_position_is_restored(loaders: list[LoaderFacts], kwargs: dict[str, bool], expected: str) -> None:
    how = data_skip(loaders, **{"dataloader_iter": False, "sized": True, **kwargs})
    assert how == expected if expected in ("sampler", "fetch", "stateful") else expected in how


def test_a_capture_is_refused_where_a_restart_from_it_would_not_continue_the_run() -> None:
    assert capture_refusal("validation_end", training_done=False, validation_follows=False) is None
    assert capture_refusal("train_batch_end", training_done=False, validation_follows=False) is None
    done = capture_refusal("validation_end", training_done=True, validation_follows=False)
    assert done is not None and "epoch-end checkpoint" in done
    follows = capture_refusal("train_batch_end", training_done=False, validation_follows=True)
    assert follows is not None and "on_validation_end" in follows


@pytest.mark.integration
@pytest.mark.parametrize(
    ("shuffle", "dropout", "workers", "how"),
    [(False, 0.0, 0, "sampler"), (True, 0.2, 0, "sampler"), (True, 0.2, 2, "fetch")],
    ids=["in-order", "shuffled+dropout", "shuffled+dropout+2-workers"],
)
def test_resume_after_a_validation_point_equals_the_uninterrupted_run(
    tmp_path: Path, shuffle: bool, dropout: float, workers: int, how: str
) -> None:
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path,
        (0, 10),
        data=lambda: Data(shuffle=shuffle, num_workers=workers),
        model=lambda: DigitsClassifier(dropout=dropout),
        **ONE_EPOCH,
    )
    cap = caps.saved[-1]
    assert (cap.moment, cap.epoch, cap.batches) == ("validation_end", 0, 8)
    assert torch.load(cap.path, weights_only=True)["flor"]["mid_epoch"]["data_skip"] == how
    assert again.result is not None and again.result.exact and again.result.how == how
    assert_same_values(full.values[cap.logged :], resumed.values)
    assert_same_state(full.final, resumed.final)
    # Lightning cannot tell that flor put the data back: it still warns (see test_a_stateful_loader_...)
    assert any(NOT_RESUMABLE in w for w in again.warnings), again.warnings


@pytest.mark.integration
def test_a_float_val_check_interval_resumes_exactly(tmp_path: Path) -> None:
    # int(20 * 0.3) = 6: validation after batches 6, 12 and 18, none as the epoch ends
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path, (0, 14), max_steps=20, limit_train_batches=20, val_check_interval=0.3
    )
    assert [c.batches for c in caps.saved] == [6, 12]
    assert again.result is not None and again.result.exact
    assert_same_values(full.values[caps.saved[-1].logged :], resumed.values)
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
@pytest.mark.parametrize(
    "captures",
    [{"at_validation": True}, {"at_validation": False, "at_batches": (5,)}],
    ids=["validation-point", "train-batch-end"],
)
def test_a_capture_inside_a_gradient_accumulation_window_resumes_exactly(
    tmp_path: Path, captures: dict[str, Any]
) -> None:
    # accumulating 2 batches per optimizer step, validating every 3: batches 3 and 9 end inside a window (the
    # gradients of their window's first batch are pending), and so does batch 5, captured at its batch end
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path,
        (0, 10),
        captures=captures,
        max_epochs=1,
        limit_train_batches=12,
        val_check_interval=3,
        accumulate_grad_batches=2,
    )
    cap = caps.saved[-1]
    assert (cap.moment, cap.batches) == (("validation_end", 9) if captures["at_validation"] else ("train_batch_end", 5))
    assert torch.load(cap.path, weights_only=True)["flor"]["mid_epoch"]["grads"]  # the window's gradients
    assert again.result is not None and again.result.exact
    assert_same_values(full.values[cap.logged :], resumed.values)
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
def test_check_val_every_n_epoch_2_resumes_inside_the_validating_epoch(tmp_path: Path) -> None:
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path, (1, 6), max_epochs=3, limit_train_batches=8, val_check_interval=4, check_val_every_n_epoch=2
    )
    cap = caps.saved[-1]
    assert [(c.epoch, c.batches) for c in caps.saved] == [(1, 4)]  # epoch 0 does not validate
    assert again.result is not None and again.result.exact
    assert_same_values(full.values[cap.logged :], resumed.values)
    assert {r[2] for r in resumed.values} == {1, 2}
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
def test_torchmetrics_logged_per_epoch_resume_with_their_state(tmp_path: Path) -> None:
    full, resumed, caps, again = interrupted_and_resumed(tmp_path, (0, 10), model=AccuracyClassifier, **ONE_EPOCH)
    assert again.result is not None and again.result.exact
    tail = full.values[caps.saved[-1].logged :]
    assert ("epoch", "train_accuracy_epoch") in {r[:2] for r in tail}
    assert_same_values(tail, resumed.values)
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
@pytest.mark.parametrize(("epoch", "kind"), [(0, "plain"), (1, "plain"), (1, "distributed")])
def test_a_capture_inside_either_epoch_of_a_two_epoch_run_resumes_exactly(
    tmp_path: Path, epoch: int, kind: str
) -> None:
    # ReduceLROnPlateau steps as each epoch ends on val_loss: the resumed epoch's end must step it too;
    # a DistributedSampler orders epoch 1 by its set_epoch(1), which the fresh one has not had
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path,
        (epoch, 6),
        data=lambda: Data(kind=kind),
        model=PlateauClassifier,
        max_epochs=2,
        limit_train_batches=8,
        val_check_interval=4,
    )
    cap = caps.saved[-1]
    assert (cap.epoch, cap.batches) == (epoch, 4)
    assert again.result is not None and again.result.exact
    assert_same_values(full.values[cap.logged :], resumed.values)
    assert_same_state(full.final, resumed.final)
    assert full.final["schedulers"][0]["last_epoch"] == 2  # it stepped as both epochs ended


@pytest.mark.integration
def test_an_aggregate_a_capture_cannot_hold_is_reported_and_only_it_differs(tmp_path: Path) -> None:
    full, resumed, caps, again = interrupted_and_resumed(tmp_path, (0, 10), model=GroupSyncedClassifier, **ONE_EPOCH)
    assert again.result is not None and again.result.exact
    assert "'train_loss' is logged with a sync_dist_group" in again.result.aggregates
    tail = full.values[caps.saved[-1].logged :]
    steps = [i for i, r in enumerate(tail) if r[0] == "step"]
    assert_same_values([tail[i] for i in steps], [resumed.values[i] for i in steps])
    (epoch_value,) = [(r, s) for r, s in zip(tail, resumed.values, strict=True) if r[1] == "train_loss_epoch"]
    assert not torch.equal(epoch_value[0][4], epoch_value[1][4])  # over the resumed batches only: not to be stored
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
def test_a_stateful_loader_resumes_from_its_own_state(tmp_path: Path) -> None:
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path, (0, 10), data=lambda: Data(kind="stateful"), **ONE_EPOCH
    )
    assert again.result is not None and again.result.exact and again.result.how == "stateful"
    assert not any(NOT_RESUMABLE in w for w in again.warnings), again.warnings
    assert_same_values(full.values[caps.saved[-1].logged :], resumed.values)
    assert_same_state(full.final, resumed.final)


@pytest.mark.integration
def test_an_iterable_dataset_without_state_is_refused_before_training_resumes(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="IterableDataset without state_dict") as err:
        interrupted_and_resumed(tmp_path, (0, 10), data=lambda: Data(kind="iterable"), **ONE_EPOCH)
    assert "StatefulDataLoader" in str(err.value)
    # the capture says so itself, so that a replay can plan around it before it starts
    capture = torch.load(tmp_path / "first" / "e0-b8-validation_end.ckpt", weights_only=True)
    assert "IterableDataset without state_dict" in capture["flor"]["mid_epoch"]["data_skip"]


@pytest.mark.integration
def test_random_numbers_drawn_at_the_epoch_start_make_the_resume_not_exact(tmp_path: Path) -> None:
    full = ValueLog()
    kw: dict[str, Any] = {"model": NoisyEpochStart, "max_epochs": 2, "limit_train_batches": 8, "val_check_interval": 4}
    run([full], **kw)
    part = ValueLog()
    caps = Captures(tmp_path, part, epoch_starts=True)
    with pytest.raises(Interrupted):
        run([part, caps, StopAt(1, 6)], **kw)
    resumed = ValueLog()
    with pytest.raises(CheckpointError, match="torch random state differs at the epoch's first batch"):
        run([resumed, Captures(tmp_path, resumed)], ckpt_path=caps.saved[-1].path, **kw)
    assert resumed.values == []  # refused before any batch ran
    # the fall-back: replay re-trains epoch 1 from the checkpoint at its start, exactly
    replayed = ValueLog()
    hooks = _EpochFromStart(caps.epoch_checkpoints[0], epoch=1)
    run([replayed], fit_loop=lambda trainer: _lightning.ReplayFitLoop(trainer, hooks), **kw)
    assert_same_values([r for r in full.values if r[2] >= 1], replayed.values)
    assert_same_state(full.final, replayed.final)


class _EpochFromStart:
    """ReplayHooks that re-train one epoch from the epoch checkpoint before it."""

    def __init__(self, path: Path, *, epoch: int) -> None:
        self.path, self.epoch = path, epoch

    def steps(self, trainer: L.Trainer) -> list[EpochStep]:
        return [EpochStep(self.epoch, "train", self.epoch - 1)]

    def load(self, epoch: int) -> dict[str, Any]:
        return dict(torch.load(self.path, weights_only=True))

    def replan(self, bad_epoch: int, remaining: list[EpochStep]) -> list[EpochStep]:
        raise AssertionError(f"checkpoint {bad_epoch} failed to load")

    def on_start(self, trainer: L.Trainer) -> None: ...

    def on_step_start(self, trainer: L.Trainer, step: EpochStep) -> None: ...

    def on_step_done(self, trainer: L.Trainer, step: EpochStep) -> None: ...


@pytest.mark.integration
def test_a_capture_at_a_training_batch_end_resumes_exactly_and_is_refused_where_it_would_not(
    tmp_path: Path,
) -> None:
    # batch 4 is followed by validation (Lightning's restart from its batch end would skip it) and training
    # ends with batch 14 (max_steps): neither is captured; batch 7 is
    full, resumed, caps, again = interrupted_and_resumed(
        tmp_path, (0, 10), captures={"at_validation": False, "at_batches": (4, 7, 14)}, **ONE_EPOCH
    )
    assert [(c.moment, c.batches) for c in caps.saved] == [("train_batch_end", 7)]
    assert caps.refused == ["validation runs after this batch; capture at its on_validation_end instead"]
    assert again.result is not None and again.result.exact
    assert_same_values(full.values[caps.saved[-1].logged :], resumed.values)
    assert_same_state(full.final, resumed.final)
    refused = Captures(tmp_path, ValueLog(), at_validation=False, at_batches=(14,))
    run([refused.values, refused], **ONE_EPOCH)
    assert refused.refused == ["the epoch's training ends with this batch; the epoch-end checkpoint covers it"]


@pytest.mark.integration
def test_a_capture_resumed_with_other_trainer_settings_is_refused(tmp_path: Path) -> None:
    part = ValueLog()
    caps = Captures(tmp_path, part)
    with pytest.raises(Interrupted):
        run([part, caps, StopAt(0, 10)], **ONE_EPOCH)
    resumed = ValueLog()
    with pytest.raises(CheckpointError, match=r"batches per epoch\) \(0, 8, 30\), the capture at \(0, 8, 45\)"):
        run(
            [resumed, Captures(tmp_path, resumed)],
            ckpt_path=caps.saved[-1].path,
            **{**ONE_EPOCH, "limit_train_batches": 30},
        )
    assert resumed.values == []


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "how"), [("plain", "sampler"), ("stateful", "stateful")])
def test_a_custom_fit_loop_runs_segments_between_captures(tmp_path: Path, kind: str, how: str) -> None:
    """What a replay split into segments does: each restores the capture at its start and the first
    stops at the next capture, without the epoch's end; together they log each value once."""
    full = ValueLog()
    run([full], data=lambda: Data(kind=kind), **ONE_EPOCH)
    recorded = ValueLog()
    caps = Captures(tmp_path, recorded)
    run([recorded, caps], data=lambda: Data(kind=kind), **ONE_EPOCH)
    at = {c.batches: c for c in caps.saved}
    assert sorted(at) == [4, 8, 12]
    loops: list[SegmentLoop] = []

    def segment(start: int, stop: int | None) -> ValueLog:
        def loop(trainer: L.Trainer) -> SegmentLoop:
            loops.append(SegmentLoop(trainer, torch.load(at[start].path, weights_only=True), stop_after=stop))
            return loops[-1]

        values = ValueLog()
        trainer = run([values], data=lambda: Data(kind=kind), fit_loop=loop, num_sanity_val_steps=0, **ONE_EPOCH)
        assert trainer.global_step == (stop or ONE_EPOCH["max_steps"])
        return values

    first, second = segment(4, 8), segment(8, None)
    assert all(lp.result is not None and lp.result.exact and lp.result.how == how for lp in loops)
    assert first.epochs_ended == [] and not any(r[0] == "epoch" and r[1] == "train_loss_epoch" for r in first.values)
    assert_same_values(full.values[at[4].logged : at[8].logged], first.values)
    assert second.epochs_ended == [0]
    assert_same_values(full.values[at[8].logged :], second.values)
    assert_same_state(full.final, second.final)


KILLED_CHILD = """\
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import lightning as L
from midepoch_runs import Captures, ValueLog, run

class Hold(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 10:
            print("holding", flush=True)
            time.sleep(600)

log = ValueLog()
run([log, Captures(Path(sys.argv[2]), log), Hold()], max_steps=14, limit_train_batches=None, val_check_interval=4)
"""


@pytest.mark.integration
def test_a_run_killed_inside_its_only_epoch_resumes_from_its_last_capture(tmp_path: Path) -> None:
    full = ValueLog()
    run([full], **ONE_EPOCH)
    (tmp_path / "child.py").write_text(KILLED_CHILD)
    folder = tmp_path / "captures"
    folder.mkdir()
    tests = str(Path(__file__).parent)
    with subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), tests, str(folder)], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        assert "holding" in child.stdout.readline()  # inside batch 11, captures after 4 and 8 written
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["e0-b4-validation_end.ckpt", "e0-b8-validation_end.ckpt"]
    resumed = ValueLog()
    again = Captures(tmp_path, resumed)
    run([resumed, again], ckpt_path=folder / files[-1], **ONE_EPOCH)
    assert again.result is not None and again.result.exact
    # the capture after batch 8 follows that validation's epoch values
    cut = 1 + max(i for i, r in enumerate(full.values) if r[0] == "epoch" and r[3] == 8)
    assert_same_values(full.values[cut:], resumed.values)
    assert_same_state(full.final, resumed.final)
