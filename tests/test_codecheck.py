"""Deciding whether new logging needs re-training, from syntax trees."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from helpers import make_venv

from flor_lightning._codecheck import (
    changed_training_path,
    decide_training,
    defined_in_project,
    is_user_file,
    library_folders,
    recorded_tree,
    user_methods,
)

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


# ---- whose code is it: a real virtualenv inside the project --------------------------------

LIBRARY = """
import torch

class LibraryModel(torch.nn.Module):
    def forward(self, x):
        return x

    def training_step(self, batch, batch_idx):
        return self(batch).sum()

    def configure_optimizers(self):
        return None
"""
USER = """
from {module} import LibraryModel

class Model(LibraryModel):
    def validation_step(self, batch, batch_idx):
        return None
"""


def test_methods_from_a_virtualenv_inside_the_project_are_not_user_code(tmp_path):
    root = tmp_path.resolve()
    site = make_venv(root / ".venv")
    (site / "venvlib_a.py").write_text(LIBRARY)
    (root / "m_venv.py").write_text(USER.format(module="venvlib_a"))
    sys.path.insert(0, str(site))
    try:
        model = load(root / "m_venv.py", "m_venv")
    finally:
        sys.path.remove(str(site))
    assert user_methods([model], root) == []  # forward, training_step, ... are the library's
    assert not is_user_file(site / "venvlib_a.py", root)
    assert is_user_file(root / "m_venv.py", root)


def test_a_virtualenv_is_known_by_its_pyvenv_cfg_wherever_it_lies(tmp_path):
    root = tmp_path.resolve()
    make_venv(root / "envs" / "py311")  # no conventional name, not in .gitignore
    vendored = root / "envs" / "py311" / "src" / "lib.py"  # e.g. an editable checkout made inside the venv
    assert not is_user_file(vendored, root, libraries=[])
    assert not is_user_file(root / "vendor" / "dist-packages" / "x.py", root, libraries=[])
    assert is_user_file(root / "envs" / "notes.py", root, libraries=[])


def test_the_interpreter_prefix_counts_inside_the_project_never_around_it(tmp_path):
    root = tmp_path.resolve()
    conda = root / "env"  # a conda prefix: no pyvenv.cfg, the stdlib right under lib/
    stdlib_file = conda / "lib" / "python3.11" / "json" / "decoder.py"
    assert not is_user_file(stdlib_file, root, libraries=[conda])
    assert is_user_file(stdlib_file, root, libraries=[])
    # a project inside the prefix (/usr/src/app beside /usr) is still the user's
    assert is_user_file(root / "model.py", root, libraries=[root.parent, root])
    assert not is_user_file(tmp_path.parent / "elsewhere.py", root, libraries=[])


def test_the_running_interpreter_s_libraries_are_not_user_code():
    import torch

    torch_file = Path(torch.__file__).resolve()
    # even with the project root drawn around the whole installation
    assert not is_user_file(torch_file, Path(torch_file.anchor))
    assert library_folders() and all(p.is_absolute() for p in library_folders())


def test_a_class_defined_in_the_project_is_the_users_whatever_its_module_is_named(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    (root / "lightning_utils.py").write_text("class MyCallback:\n    pass\n")
    spec = importlib.util.spec_from_file_location("lightning_utils", root / "lightning_utils.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lightning_utils", module)
    spec.loader.exec_module(module)
    import lightning.pytorch.callbacks as library

    assert defined_in_project(module.MyCallback, root)
    assert not defined_in_project(library.ModelCheckpoint, root)
    assert not defined_in_project(int, root)


# ---- deciding a replay's re-training: the recorded code read through the given reader ------------

CALLBACK = """
class GradProbe:
    def on_after_backward(self, trainer, pl_module):
        return None
"""


def decide(tmp_path: Path, model_now: str, *, callback_now: str = CALLBACK, **kwargs: object) -> tuple[bool, str]:
    root = tmp_path.resolve()
    (root / "m_decide.py").write_text(model_now)
    (root / "cb_decide.py").write_text(callback_now)
    recorded = {root / "m_decide.py": BEFORE, root / "cb_decide.py": CALLBACK}
    import lightning.pytorch.callbacks as library

    callbacks = [load_class(root / "cb_decide.py", "cb_decide", "GradProbe"), library.ModelCheckpoint()]
    return decide_training(
        kwargs.pop("settings", {"val_check_interval": 1.0}),
        model=load(root / "m_decide.py", "m_decide"),
        callbacks=callbacks,
        root=root,
        read_recorded=kwargs.pop("read_recorded", recorded.get),
    )


def load_class(path: Path, name: str, cls: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, cls)()


def test_a_validation_change_restores(tmp_path):
    now = BEFORE.replace("return None", "self.log('val_f1', 1.0)\n        return None")
    assert decide(tmp_path, now) == (
        False,
        "the training path is unchanged since the recording; only validation and epoch-end hooks run",
    )


def test_a_training_step_change_re_trains_and_says_which(tmp_path):
    now = BEFORE.replace("return loss", "self.log('grad_norm', 1.0)\n        return loss")
    assert decide(tmp_path, now) == (True, "the training path changed since the recording: Model.training_step")


def test_a_project_callback_s_training_hook_counts_a_library_callback_s_does_not(tmp_path):
    probe = CALLBACK.replace("return None", "pl_module.log('g', 1.0)")
    retrain, reason = decide(tmp_path, BEFORE, callback_now=probe)
    assert retrain and reason.endswith(": GradProbe.on_after_backward")  # ModelCheckpoint's hooks never count


def test_without_a_code_snapshot_it_restores(tmp_path):
    now = BEFORE.replace("return loss", "self.log('grad_norm', 1.0)\n        return loss")
    retrain, reason = decide(tmp_path, now, read_recorded=None)
    assert not retrain and reason.startswith("the run has no code snapshot to compare with")


def test_validation_inside_the_epoch_always_re_trains(tmp_path):
    retrain, reason = decide(tmp_path, BEFORE, settings={"val_check_interval": 0.5}, read_recorded=None)
    assert retrain and "val_check_interval" in reason
