"""The replay planner: pure decisions, no Trainer."""

from __future__ import annotations

import pytest

from flor_lightning._errors import ReplayError
from flor_lightning._planner import (
    EpochStep,
    bridge,
    describe,
    epoch_list,
    epochs_of_steps,
    estimate_seconds,
    plan_segments,
    slice_steps,
    split_epoch,
    split_segments,
    start_inside,
    steps_for,
    validate_epochs,
    validate_segment_args,
    validate_steps,
    validation_points,
    with_points,
)


def test_epoch_list_defaults_to_all_recorded_and_rejects_unrecorded():
    assert epoch_list(None, [2, 0, 1]) == [0, 1, 2]
    assert epoch_list(range(1, 3), [0, 1, 2, 3]) == [1, 2]
    with pytest.raises(ReplayError, match=r"epochs \[7\] were not recorded; recorded epochs: 0-5"):
        epoch_list([4, 7], range(6))
    with pytest.raises(ReplayError, match="no completed epoch"):
        epoch_list(None, [])


def test_restore_when_every_epoch_has_a_checkpoint():
    assert steps_for([0, 1, 2], {-1, 0, 1, 2}, train=False) == [
        EpochStep(0, "restore", 0),
        EpochStep(1, "restore", 1),
        EpochStep(2, "restore", 2),
    ]


def test_retrain_loads_the_checkpoint_before_each_epoch():
    assert steps_for([0, 1, 2], {-1, 0, 1, 2}, train=True) == [
        EpochStep(0, "train", -1),
        EpochStep(1, "train", 0),
        EpochStep(2, "train", 1),
    ]


def test_sparse_checkpoints_restore_the_nearest_earlier_and_train_forward():
    # checkpoint_every=3: checkpoints -1, 2, 5
    have = {-1, 2, 5}
    assert steps_for([4], have, train=False) == [EpochStep(3, "train", 2, wanted=False), EpochStep(4, "train", None)]
    assert steps_for([2, 3, 4, 5], have, train=False) == [
        EpochStep(2, "restore", 2),
        EpochStep(3, "train", 2),  # loads again: the epoch-end hooks of a restored epoch may have run code
        EpochStep(4, "train", None),
        EpochStep(5, "restore", 5),
    ]


def test_missing_start_checkpoint_is_an_error_naming_what_exists():
    with pytest.raises(
        ReplayError, match=r"no usable checkpoint at or before epoch 1 .*checkpoints exist for epochs 3-4.*segments=1"
    ):
        steps_for([2], {3, 4}, train=True)


def test_with_no_checkpoint_left_scratch_trains_from_the_start():
    """Every checkpoint freed (flor gc) or lost: with ``scratch`` the model as passed in is the initial state."""
    assert steps_for([0, 1], set(), train=False, scratch=True) == [
        EpochStep(0, "train", None),
        EpochStep(1, "train", None),
    ]
    assert steps_for([2], set(), train=True, scratch=True) == [
        EpochStep(0, "train", None, wanted=False),
        EpochStep(1, "train", None, wanted=False),
        EpochStep(2, "train", None),
    ]
    # past the first epoch, a gap is trained forward from the state the previous step left
    assert steps_for([0, 2], set(), train=True, scratch=True)[1:] == [
        EpochStep(1, "train", None, wanted=False),
        EpochStep(2, "train", None),
    ]
    plan = plan_segments([0, 1, 2, 3], set(), train=True, segments=2, cost={}, scratch=True)
    assert [s.epochs for s in plan] == [(0, 1), (2, 3)] and plan[1].steps[0] == EpochStep(0, "train", None, False)
    with pytest.raises(ReplayError, match="segments=1"):  # one process, segments one after another: no fresh model
        plan_segments([0, 1, 2, 3], set(), train=True, segments=2, cost={})


@pytest.mark.parametrize(
    ("epochs", "message"),
    [
        (5, r"a list or range of recorded epoch numbers .*epochs=\[5\].*range\(5\).*got 5"),
        ("abc", "a list or range of recorded epoch numbers"),
        ([1.5], r"whole epoch numbers .*got \[1\.5\]"),
        ([True], r"whole epoch numbers .*got \[True\]"),
        ({"a": 1}, "a list or range"),
    ],
)
def test_epochs_that_are_no_list_of_whole_numbers_are_refused(epochs: object, message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        validate_epochs(epochs)


def test_epochs_given_as_collections_of_whole_numbers_are_accepted() -> None:
    import numpy as np

    for epochs in (None, range(3), [0, 2], (1,), {2}, np.arange(2), [np.int64(1)]):
        validate_epochs(epochs)


def test_segments_are_contiguous_balanced_and_cover_every_epoch():
    epochs = list(range(10))
    groups = split_segments(epochs, 3, {e: 1.0 for e in epochs})
    assert [e for g in groups for e in g] == epochs
    assert [len(g) for g in groups] in ([3, 3, 4], [3, 4, 3], [4, 3, 3])
    # one expensive epoch gets a segment of its own
    cost = {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert split_segments([0, 1, 2, 3], 2, cost) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("segments", [0, 5])
def test_segment_count_must_fit_the_epochs(segments):
    with pytest.raises(ReplayError, match="segments must be between 1 and the number of epochs replayed"):
        split_segments([0, 1, 2, 3], segments, {})


def test_each_segment_starts_from_its_own_checkpoint():
    plan = plan_segments([0, 1, 2, 3], {-1, 0, 1, 2, 3}, train=True, segments=2, cost={})
    assert [s.epochs for s in plan] == [(0, 1), (2, 3)]
    assert plan[1].steps[0] == EpochStep(2, "train", 1)


@pytest.mark.parametrize(
    ("segments", "segment", "message"),
    [
        (0, None, "segments must be a whole number >= 1"),
        (2.5, None, "segments must"),
        (2, 2, r"segment must .* 0\.\.1"),
        (2, -1, "segment must"),
        (True, None, "segments must"),
    ],
)
def test_segment_arguments_are_validated(segments, segment, message):
    with pytest.raises(ReplayError, match=message):
        validate_segment_args(segments, segment)


def test_estimate_counts_loads_validation_and_training():
    steps = [EpochStep(0, "restore", 0), EpochStep(1, "train", 0)]
    assert estimate_seconds(steps, {0: 10.0, 1: 10.0}, {0: 1.0, 1: 1.0}, 0.5) == pytest.approx(0.5 + 1 + 0.5 + 1 + 10)


@pytest.mark.parametrize(("epochs", "text"), [([], ""), ([3], "3"), ([0, 1, 2], "0-2"), ([0, 2], "[0, 2]")])
def test_describe_epochs(epochs: list[int], text: str) -> None:
    assert describe(epochs) == text


def test_validation_points_inside_epochs_each_need_a_checkpoint() -> None:
    inside = {0: {3: 2, 6: 5}, 1: {9: 2}}
    points = validation_points([0, 1], validated_at={0: {3, 6, 8}, 1: {9}}, end_steps={0: 8, 1: 16}, inside=inside)
    assert points == {0: ((2, 5), True), 1: ((2,), False)}  # epoch 1 did not validate at its end (step 16)
    missing = validation_points([0], validated_at={0: {3, 6}}, end_steps={0: 8}, inside={0: {3: 2}})
    assert missing == "epoch 0 validated at step 6, where it has no checkpoint"
    assert "no validation value" in str(validation_points([0], validated_at={}, end_steps={0: 8}, inside={}))
    steps = with_points(steps_for([0, 1], {-1, 0, 1}, train=False), points)
    assert [(s.epoch, s.action, s.inside, s.validate_end) for s in steps] == [
        (0, "restore", (2, 5), True),
        (1, "restore", (2,), False),
    ]


def test_the_planner_docstrings_run() -> None:
    import doctest

    from flor_lightning import _planner

    assert doctest.testmod(_planner).failed == 0


def test_a_restore_with_validation_points_inside_counts_their_loads() -> None:
    plain, inside = EpochStep(0, "restore", 0), EpochStep(0, "restore", 0, inside=(2, 5), validate_end=True)
    assert estimate_seconds([plain], {0: 9.0}, {0: 1.0}, 0.5) == 1.5
    assert estimate_seconds([inside], {0: 9.0}, {0: 1.0}, 0.5) == 1.0 + 4 * 0.5  # its own, two inside, its own again


# ---- inside an epoch: step slices, segments of one epoch, bridging a missing epoch checkpoint ----------------

POINTS = [(3, 2, "validation_end"), (6, 5, "validation_end"), (8, 7, "train_batch_end"), (9, 8, "validation_end")]


def test_a_slice_starts_from_the_latest_checkpoint_whose_restart_logs_every_value_of_it():
    assert start_inside(7, POINTS) == (6, 5, "validation_end")
    assert start_inside(6, POINTS) == (3, 2, "validation_end")  # the validation at step 6 precedes its checkpoint
    assert start_inside(8, POINTS) == (8, 7, "train_batch_end")  # the batch at step 8 follows its checkpoint
    assert start_inside(3, POINTS) is None  # from the epoch's start


def test_a_slice_narrows_the_plan_to_its_steps_and_epochs():
    assert epochs_of_steps(range(11, 13), {0: (0, 12), 1: (12, 24), 2: (24, 36)}) == [0, 1]
    with pytest.raises(ReplayError, match="steps 40-41 were not recorded; the run logged values at global steps 0-36"):
        epochs_of_steps(range(40, 42), {0: (0, 12), 1: (12, 24), 2: (24, 36)})
    steps = [EpochStep(0, "train", -1, wanted=False), EpochStep(1, "train", None), EpochStep(2, "train", None)]
    out = slice_steps(steps, range(20, 30), start=(1, 5), stop=(2, 4))
    assert [(s.epoch, s.load, s.start_inside, s.stop_after, s.keep) for s in out] == [
        (1, None, 5, None, (20, 30)),
        (2, None, None, 4, (20, 30)),
    ]


def test_steps_must_be_a_non_empty_range_and_not_given_with_epochs():
    validate_steps(None, [1])
    validate_steps(range(3, 5), None)
    for bad in ([3, 4], range(5, 5), range(0, 10, 2), range(-1, 3), 7):
        with pytest.raises(ReplayError, match="steps must be a non-empty range"):
            validate_steps(bad, None)
    with pytest.raises(ReplayError, match="not both"):
        validate_steps(range(3), [0])


def test_one_epoch_is_divided_into_segments_balanced_by_cost_each_value_once():
    restore = EpochStep(0, "restore", 0, inside=(2, 5, 8))
    parts = split_epoch(restore, 3, cuts=(), cost=[1, 1, 1, 1])  # the points after batches 2, 5, 8, then the end
    assert [(p.load, p.inside, p.end) for p in parts] == [(None, (2,), False), (None, (5, 8), False), (0, (), True)]
    train = EpochStep(0, "train", -1)
    parts = split_epoch(train, 2, cuts=(2, 5, 8), cost=[10, 1, 1, 1])  # the first stretch is the slow one
    assert [(p.load, p.start_inside, p.stop_after) for p in parts] == [(-1, None, 3), (None, 2, None)]
    with pytest.raises(ReplayError, match="segments must be between 1 and the 4 stretches"):
        split_epoch(train, 5, cuts=(2, 5, 8), cost=[1, 1, 1, 1])


def test_a_stretch_trained_only_to_reach_a_wanted_epoch_starts_from_the_latest_checkpoint_inside_it():
    steps = steps_for([3], {0}, train=True)
    assert [(s.epoch, s.load, s.wanted) for s in steps] == [(1, 0, False), (2, None, False), (3, None, True)]
    out = bridge(steps, {1: 4, 2: 6})
    assert [(s.epoch, s.load, s.start_inside, s.wanted) for s in out] == [(2, None, 6, False), (3, None, None, True)]
    assert bridge(steps, {}) == steps


def test_a_train_step_inside_an_epoch_is_estimated_at_its_share_of_the_epoch():
    part = EpochStep(0, "train", None, start_inside=5, stop_after=9)  # batches 6-8 of 12
    assert estimate_seconds([part], {0: 12.0}, {0: 4.0}, 0.5, 12) == pytest.approx(0.5 + 3 / 12 * 16)
    assert estimate_seconds([part], {0: 12.0}, {0: 4.0}, 0.5) == 16.5  # batches per epoch unknown: all of it
