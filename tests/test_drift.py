"""How a replay's set-up differs from the recording's: plain data in, warnings or a refusal out."""

from __future__ import annotations

import math

import pytest

from flor_lightning._drift import changed_hparams, check_like_recording, warn_hparams
from flor_lightning._errors import ReplayError

SETTINGS = {"num_training_batches": 8, "max_epochs": 3}


def test_changed_hyperparameters_are_named_with_both_values():
    recorded = {"lr": 0.1, "layers": 2, "dropout": 0.5}
    now = {"lr": 0.01, "layers": 2, "width": 64}
    assert changed_hparams(recorded, now) == [
        "dropout='(none)' (recorded 0.5)",
        "lr=0.01 (recorded 0.1)",
        "width=64 (recorded '(none)')",
    ]


def test_hyperparameters_compare_as_stored_through_json():
    # a tuple is stored as a JSON list, an object by its repr: neither counts as a change
    recorded = {"sizes": [32, 16], "act": "ReLU()"}
    assert changed_hparams(recorded, {"sizes": (32, 16), "act": _Repr("ReLU()")}) == []


class _Repr:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def test_warn_hparams_names_the_run_and_how_to_list_its_values():
    run = {"run_id": "abc", "hparams": '{"lr": 0.1}'}
    with pytest.warns(UserWarning, match=r"differ from run abc's recording: lr=0.2 \(recorded 0.1\).*flor show abc"):
        warn_hparams(run, {"lr": 0.2})


def test_warn_hparams_is_silent_when_they_agree(recwarn):
    warn_hparams({"run_id": "abc", "hparams": '{"lr": 0.1}'}, {"lr": 0.1})
    warn_hparams({"run_id": "abc", "hparams": None}, {})
    assert not [w for w in recwarn if "flor" in str(w.message)]


def test_other_data_is_refused_when_re_training():
    with pytest.raises(ReplayError, match=r"has 5 batches per epoch but the recording had 8.*cannot reproduce"):
        check_like_recording(SETTINGS, batches=5, max_epochs=3, retrain=True)


def test_other_data_is_only_warned_about_when_restoring():
    with pytest.warns(UserWarning, match=r"has 5 batches per epoch but the recording had 8; .*restored epochs"):
        check_like_recording(SETTINGS, batches=5, max_epochs=3, retrain=False)


def test_other_max_epochs_is_warned_about():
    with pytest.warns(UserWarning, match="the recording used max_epochs=3, this Trainer has max_epochs=10"):
        check_like_recording(SETTINGS, batches=8, max_epochs=10, retrain=True)


def test_the_same_set_up_or_an_unknown_length_passes(recwarn):
    check_like_recording(SETTINGS, batches=8, max_epochs=3, retrain=True)
    check_like_recording(SETTINGS, batches=math.inf, max_epochs=3, retrain=True)  # an iterable without a length
    check_like_recording({}, batches=5, max_epochs=10, retrain=True)  # recorded before these were kept
    assert not [w for w in recwarn if "flor" in str(w.message)]
