"""When a recording checkpoints: pure decisions over plain numbers (no Trainer, no clock, no waiting).

A whole-number ``checkpoint_every`` checkpoints the initial state and every ``every``-th epoch,
counted from the start. With ``"auto"`` the period follows the measured cost: the initial state,
then each epoch ``period`` epochs after the latest checkpoint, where :func:`next_period` sets the
period from the latest checkpoint's CPU cost and the epoch time. The last epoch is checkpointed
whatever these say (the callback does it as training ends).

The callback measures and waits (for the first write's cost to be known); these functions only decide.
"""

from __future__ import annotations

import math


def due(done_epoch: int, *, period: int, last_checkpointed: int | None, auto: bool) -> bool:
    """Whether the state once ``done_epoch`` is done (-1: the initial state) is to be checkpointed.

    Args:
        done_epoch: the epoch just completed; -1 before the first.
        period: a fixed ``checkpoint_every``, or the period ``"auto"`` chose last.
        last_checkpointed: the latest epoch checkpointed so far (or tried), None before any.
        auto: ``checkpoint_every="auto"``: counted from ``last_checkpointed``; otherwise from the start.

    Example:
        >>> [e for e in range(-1, 7) if due(e, period=3, last_checkpointed=None, auto=False)]
        [-1, 2, 5]
        >>> due(4, period=3, last_checkpointed=2, auto=True), due(5, period=3, last_checkpointed=2, auto=True)
        (False, True)
    """
    if not auto:
        return (done_epoch + 1) % period == 0
    return done_epoch < 0 or last_checkpointed is None or done_epoch - last_checkpointed >= period


def auto_period(cost_seconds: float, epoch_seconds: float, budget: float) -> int:
    """The checkpoint period, in epochs, that keeps checkpointing's CPU under ``budget`` of training.

    ``cost_seconds`` is the CPU one checkpoint takes (the snapshot on the training thread plus the
    background write), ``epoch_seconds`` an epoch's wall time and ``budget`` a fraction of it.

    Example:
        >>> auto_period(0.2, 2.0, 0.02)  # 0.2 s per checkpoint, 0.04 s allowed per epoch
        5
    """
    if epoch_seconds <= 0 or budget <= 0:
        return 1
    return max(1, math.ceil(cost_seconds / (budget * epoch_seconds) - 1e-9))


def next_period(
    period: int, *, write_cpu_seconds: float | None, snapshot_seconds: float, epoch_seconds: float, budget: float
) -> int:
    """The ``"auto"`` period once the latest checkpoint's cost is known: its background write's CPU
    (``write_cpu_seconds``, None while no write has succeeded) plus its snapshot on the training thread,
    against ``epoch_seconds`` (0 while no epoch has been timed). ``period`` stays while either is unknown.

    Example:
        >>> next_period(1, write_cpu_seconds=0.15, snapshot_seconds=0.05, epoch_seconds=2.0, budget=0.02)
        5
        >>> next_period(5, write_cpu_seconds=None, snapshot_seconds=0.05, epoch_seconds=2.0, budget=0.02)
        5
    """
    if write_cpu_seconds is None or epoch_seconds <= 0:
        return period
    return auto_period(write_cpu_seconds + snapshot_seconds, epoch_seconds, budget)
