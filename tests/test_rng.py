"""flor_lightning._rng: capture, restore and compare every generator."""

from __future__ import annotations

import random

import numpy as np
import torch

from flor_lightning import _rng as rng


def test_differs_names_each_generator_that_moved_and_none_after_a_restore() -> None:
    start = rng.capture()
    assert rng.differs(start, rng.capture()) == []
    torch.rand(1)
    assert rng.differs(start, rng.capture()) == ["torch"]
    random.random()
    np.random.rand()
    assert rng.differs(start, rng.capture()) == ["python", "numpy", "torch"]
    rng.restore(start)
    assert rng.differs(start, rng.capture()) == []
