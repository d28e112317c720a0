"""The checkpoint schedule: pure decisions, tested without a Trainer."""

from __future__ import annotations

import doctest

import pytest

from flor_lightning import _schedule as schedule
from flor_lightning._schedule import auto_period, due, due_inside, next_period


def checkpointed(epochs: int, *, period: int, auto: bool, already: tuple[int, ...] = ()) -> list[int]:
    """The epochs ``due`` picks over a run of ``epochs`` epochs, each pick becoming the latest checkpoint."""
    done = list(already)
    for epoch in range(-1, epochs):
        if epoch not in done and due(epoch, period=period, last_checkpointed=max(done, default=None), auto=auto):
            done.append(epoch)
    return sorted(done)


@pytest.mark.parametrize(("period", "expected"), [(1, [-1, 0, 1, 2, 3, 4, 5, 6]), (3, [-1, 2, 5]), (10, [-1])])
def test_a_fixed_period_counts_from_the_start(period: int, expected: list[int]) -> None:
    assert checkpointed(7, period=period, auto=False) == expected


def test_a_fixed_period_ignores_earlier_checkpoints() -> None:
    """A resumed run whose last epoch (4) was checkpointed as training ended keeps its count from the start."""
    assert checkpointed(10, period=3, auto=False, already=(-1, 2, 4)) == [-1, 2, 4, 5, 8]


def test_auto_counts_from_the_latest_checkpoint() -> None:
    assert checkpointed(10, period=3, auto=True, already=(-1, 2, 4)) == [-1, 2, 4, 7]
    assert checkpointed(7, period=3, auto=True) == [-1, 2, 5]


def test_auto_always_checkpoints_the_initial_state_and_the_first_epoch_after_none() -> None:
    assert due(-1, period=100, last_checkpointed=-1, auto=True)
    assert due(3, period=100, last_checkpointed=None, auto=True)
    assert not due(3, period=100, last_checkpointed=-1, auto=True)


@pytest.mark.parametrize(
    ("cost", "epoch", "budget", "period"),
    [(0.2, 2.0, 0.02, 5), (0.2, 2.0, 0.1, 1), (0.21, 2.0, 0.1, 2), (0.0, 2.0, 0.02, 1), (1.0, 0.0, 0.02, 1)],
)
def test_auto_checkpoint_period_keeps_cost_under_budget(cost: float, epoch: float, budget: float, period: int) -> None:
    assert auto_period(cost, epoch, budget) == period
    if epoch > 0 and cost > 0:  # the period chosen spends at most the budget, one period fewer would not
        assert cost / period <= budget * epoch + 1e-12
        assert period == 1 or cost / (period - 1) > budget * epoch


def test_next_period_adds_the_snapshot_to_the_write() -> None:
    # 0.3 s of write alone would allow every 4th epoch; with the 0.1 s snapshot it is every 5th
    assert next_period(1, write_cpu_seconds=0.3, snapshot_seconds=0.0, epoch_seconds=4.0, budget=0.02) == 4
    assert next_period(1, write_cpu_seconds=0.3, snapshot_seconds=0.1, epoch_seconds=4.0, budget=0.02) == 5


@pytest.mark.parametrize(("write", "epoch"), [(None, 4.0), (0.3, 0.0), (None, 0.0)])
def test_next_period_keeps_the_period_while_a_cost_is_unknown(write: float | None, epoch: float) -> None:
    assert next_period(7, write_cpu_seconds=write, snapshot_seconds=0.1, epoch_seconds=epoch, budget=0.02) == 7


def test_the_examples_in_the_docstrings_hold() -> None:
    failed, attempted = doctest.testmod(schedule)
    assert attempted >= 5 and failed == 0


def test_inside_an_epoch_a_fixed_schedule_takes_every_validation_point_and_every_nth_step() -> None:
    kw = {"every_n_steps": 2, "period": None}
    assert [s for s in range(1, 7) if due_inside(s, validation=False, last_step=s - 1, **kw)] == [2, 4, 6]
    # accumulating gradients, a validation point may come batches after the checkpoint of its step
    assert due_inside(4, validation=True, last_step=4, **kw)
    assert not due_inside(4, validation=False, last_step=4, **kw)


def test_inside_an_epoch_auto_waits_for_its_period_in_steps() -> None:
    kw = {"validation": True, "every_n_steps": None, "period": 3}
    assert [s for s in range(1, 10) if due_inside(s, last_step=0, **kw)] == [3, 4, 5, 6, 7, 8, 9]
    assert not due_inside(2, last_step=None, validation=False, every_n_steps=None, period=3)
    assert due_inside(2, last_step=None, **kw)  # before any checkpoint of this session
