"""Restarting inside an epoch continues the recorded trajectory bit for bit (flor_lightning.midepoch and
the mid-epoch part of flor_lightning._lightning).

Each integration test runs the digits model uninterrupted, then again with captures, interrupted
after one, then resumed from it in a fresh Trainer and model; every value the resumed run logs
(each ``self.log`` call and each epoch aggregate, training and validation) and its final state
(weights, optimizer, schedulers, RNG) must equal the uninterrupted run's from that point on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from midepoch_runs import Captures, Data, Interrupted, StopAt, ValueLog, assert_same_state, assert_same_values, run
from models import DigitsClassifier

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
    run([resumed, again], ckpt_path=caps.saved[pick].path, **kw)
    return full, resumed, caps, again


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
    assert again.result is not None and again.result.exact and again.result.how == how
    assert_same_values(full.values[cap.logged :], resumed.values)
    assert_same_state(full.final, resumed.final)
