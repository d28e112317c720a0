"""How a replay's set-up differs from the recording's: hyperparameters, batches per epoch, ``max_epochs``.

A difference is warned about; training batches that differ from the recorded ones refuse re-training,
which could not reproduce the run on other data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from flor_lightning._errors import ReplayError


def changed_hparams(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``name=now (recorded was)`` for each hyperparameter that differs (compared as stored: through JSON).

    Example:
        >>> changed_hparams({"lr": 0.1, "layers": 2}, {"lr": 0.01, "layers": 2})
        ['lr=0.01 (recorded 0.1)']
    """
    now = json.loads(json.dumps(current, default=repr))
    return [
        f"{k}={now.get(k, '(none)')!r} (recorded {recorded.get(k, '(none)')!r})"
        for k in sorted(set(recorded) | set(now))
        if recorded.get(k, "(none)") != now.get(k, "(none)")
    ]


def warn_hparams(run: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Warn when the ``current`` hyperparameters differ from those recorded with ``run`` (its ``runs`` row)."""
    changed = changed_hparams(json.loads(run["hparams"] or "{}"), current)
    if changed:
        rank_zero_warn(
            f"flor: the hyperparameters differ from run {run['run_id']}'s recording: {', '.join(changed)}. "
            f"The replay reproduces it only with the recorded ones (`flor show {run['run_id']}` lists them)"
        )


def check_like_recording(settings: Mapping[str, Any], *, batches: float, max_epochs: int | None, retrain: bool) -> None:
    """Warn (restoring) or refuse (re-training) when the data or epochs differ from the recording.

    Args:
        settings: the Trainer settings recorded with the run.
        batches: the training batches per epoch now (``trainer.num_training_batches``; ``inf`` when unknown).
        max_epochs: the Trainer's ``max_epochs`` now.
        retrain: whether the replay re-trains.
    """
    recorded = settings.get("num_training_batches")
    if recorded is not None and not (isinstance(batches, float) and math.isinf(batches)) and recorded != batches:
        msg = (
            f"the training data has {batches} batches per epoch but the recording had {recorded}; "
            "replay with the same data, batch size and limit_train_batches"
        )
        if retrain:
            raise ReplayError(msg + " (re-training on other data cannot reproduce the run)")
        rank_zero_warn(f"flor: {msg}; restored epochs are unaffected, but step numbers may not line up")
    if settings.get("max_epochs") not in (None, max_epochs):
        rank_zero_warn(
            f"flor: the recording used max_epochs={settings['max_epochs']}, this Trainer has "
            f"max_epochs={max_epochs}; schedules that depend on it may differ"
        )
