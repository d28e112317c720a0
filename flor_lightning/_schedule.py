"""When a recording checkpoints: pure decisions over plain numbers (no Trainer, no clock, no waiting).

A whole-number ``checkpoint_every`` checkpoints the initial state and every ``every``-th epoch,
counted from the start. With ``"auto"`` the period follows the measured cost: the initial state,
then each epoch ``period`` epochs after the latest checkpoint, where :func:`next_period` sets the
period from the latest checkpoint's CPU cost and the epoch time. The last epoch is checkpointed
whatever these say (the callback does it as training ends).

Inside an epoch the moments are the validation points (``val_check_interval``) and, with
``checkpoint_every_n_steps=N``, every N-th optimizer step. With a whole-number ``checkpoint_every``
each such moment is checkpointed (:func:`due_inside`); with ``"auto"`` validation points come
first, and a moment is checkpointed once the training time since the latest checkpoint pays for one
within the budget: the period, in optimizer steps, is :func:`auto_period` of the latest
checkpoint's cost against the time of one step. A moment skipped is reached in replay by
re-training forward from the checkpoint before it.

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


def due_inside(
    step: int, *, validation: bool, every_n_steps: int | None, last_step: int | None, period: int | None
) -> bool:
    """Whether the state at global ``step``, inside an epoch, is to be checkpointed.

    Args:
        step: the global (optimizer) step now.
        validation: this is a validation point's end; otherwise an optimizer step just done.
        every_n_steps: ``checkpoint_every_n_steps`` (None: only validation points are moments).
        last_step: the global step of the latest checkpoint (None before any).
        period: with ``"auto"``, the period in steps (:func:`auto_period` per step); None: every moment.

    Example:
        >>> fixed = dict(every_n_steps=None, last_step=0, period=None)
        >>> [s for s in range(1, 13) if due_inside(s, validation=s % 4 == 0, **fixed)]
        [4, 8, 12]
        >>> due_inside(6, validation=False, every_n_steps=3, last_step=0, period=None)
        True
        >>> due_inside(8, validation=True, every_n_steps=None, last_step=4, period=5)  # 4 steps since: too soon
        False
    """
    if last_step is not None and step <= last_step and (period is not None or not validation):
        # no optimizer step since the latest checkpoint; a validation point still is one (accumulating
        # gradients, it may follow a checkpoint taken at the same step, batches later)
        return False
    if not validation and (every_n_steps is None or step % every_n_steps):
        return False
    return period is None or last_step is None or step - last_step >= period
