"""Deciding whether new logging needs re-training, from syntax trees."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from flor_lightning.codecheck import changed_training_path, recorded_tree, user_methods

BEFORE = """
import torch

class Model(torch.nn.Module):
    def forward(self, x):
        return x * 2

    def training_step(self, batch, batch_idx):
        loss = self(batch).sum()
        return loss

    def validation_step(self, batch, batch_idx):
        return None
"""


def load(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.Model()


def check(tmp_path: Path, now: str, name: str) -> list[str]:
    file = tmp_path / f"{name}.py"
    file.write_text(now)
    methods = user_methods([load(file, name)], tmp_path)
    return changed_training_path(methods, lambda f: BEFORE if f == file.resolve() else None)


def test_validation_only_change_keeps_the_training_path(tmp_path):
    now = BEFORE.replace("return None", "self.log('val_f1', 1.0)\n        return None")
    assert check(tmp_path, now, "m_val") == []


def test_comments_and_formatting_do_not_count(tmp_path):
    now = BEFORE.replace("loss = self(batch).sum()", "# a comment\n        loss = self( batch ).sum()  # why")
    assert check(tmp_path, now, "m_fmt") == []


def test_training_step_change_is_found(tmp_path):
    now = BEFORE.replace("return loss", "self.log('grad_norm', 1.0)\n        return loss")
    assert check(tmp_path, now, "m_train") == ["Model.training_step"]


def test_a_new_training_hook_counts_as_a_change(tmp_path):
    now = BEFORE + "\n    def on_after_backward(self):\n        self.log('g', 1.0)\n"
    assert check(tmp_path, now, "m_hook") == ["Model.on_after_backward"]


def test_a_file_missing_from_the_recording_counts_as_changed(tmp_path):
    file = tmp_path / "m_new.py"
    file.write_text(BEFORE)
    methods = user_methods([load(file, "m_new")], tmp_path)
    assert sorted(changed_training_path(methods, lambda f: None)) == ["Model.forward", "Model.training_step"]


def test_methods_of_library_classes_are_ignored(tmp_path):
    import torch

    assert user_methods([torch.nn.Linear(2, 2)], tmp_path) == []


def test_recorded_tree_finds_nested_classes():
    src = "class A:\n    class B:\n        def training_step(self):\n            return 1\n"
    assert recorded_tree(src, ("A", "B"), "training_step") is not None
    assert recorded_tree(src, ("A",), "training_step") is None
    assert recorded_tree("def broken(:", ("A",), "x") is None
