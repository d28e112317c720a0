"""Does a replay need to re-train? Compare the training-path code now with the recorded version.

New logging in ``validation_step`` or an epoch-end hook can be replayed from checkpoints;
new logging in ``training_step``, ``forward`` or a batch/optimizer hook needs the training
batches to run again. The comparison is on syntax trees, so comments and formatting do not
count as changes.

Only the user's own code is compared: a method counts when :func:`is_user_file` says its file
is part of the project, so Lightning's (or any installed library's) methods never do, even
from a virtualenv inside the repository.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINING_HOOKS = (
    "forward",
    "training_step",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "optimizer_step",
    "on_before_zero_grad",
    "optimizer_zero_grad",
    "configure_gradient_clipping",
    "configure_optimizers",
    "on_train_epoch_start",
)


@dataclass(frozen=True)
class MethodSource:
    """Where a training-path method of a user class is defined, and its syntax tree dump."""

    file: Path
    class_path: tuple[str, ...]
    name: str
    tree: str


def _dump(source: str) -> str | None:
    try:
        node = ast.parse(textwrap.dedent(source)).body[0]
    except (SyntaxError, IndexError):
        return None
    return ast.dump(node)


_PACKAGE_FOLDERS = ("site-packages", "dist-packages")


@functools.cache
def library_folders() -> tuple[Path, ...]:
    """Where this interpreter keeps the standard library and installed packages (its prefixes too)."""
    paths = sysconfig.get_paths()
    found = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    found += [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    return tuple(dict.fromkeys(Path(p).resolve() for p in found))


def holds_pyvenv_cfg(folder: Path) -> bool:
    """Whether ``folder`` is a virtualenv (``python -m venv``, virtualenv, uv all write ``pyvenv.cfg``)."""
    return (folder / "pyvenv.cfg").is_file()


def is_user_file(
    file: Path,
    root: Path,
    *,
    libraries: Iterable[Path] | None = None,
    is_venv: Callable[[Path], bool] = holds_pyvenv_cfg,
) -> bool:
    """Whether ``file`` is the user's own code: under the project ``root`` and in no library.

    A file is not the user's when it lies in a ``site-packages`` or ``dist-packages`` folder, in
    a folder holding a ``pyvenv.cfg`` (a virtualenv), or under one of ``libraries`` (default
    :func:`library_folders`: the interpreter's prefixes, standard library and site-packages),
    wherever those are, inside ``root`` too. Only folders below ``root`` are looked at: a project
    that itself lies inside an interpreter's prefix (``/usr/src/app`` beside ``/usr``) stays the user's.

    Example:
        >>> is_user_file(Path("/p/.venv/lib/python3.11/site-packages/lightning/core.py"), Path("/p"))
        False
        >>> is_user_file(Path("/p/model.py"), Path("/p"), is_venv=lambda folder: False)
        True
    """
    if root not in file.parents:
        return False
    folder = root
    for part in file.relative_to(root).parts[:-1]:
        folder = folder / part
        if part in _PACKAGE_FOLDERS or is_venv(folder):
            return False
    inside = [lib for lib in (library_folders() if libraries is None else libraries) if root in lib.parents]
    return not any(lib in file.parents for lib in inside)


def defined_in_project(cls: type, root: Path) -> bool:
    """Whether class ``cls`` is defined in a file of the project at ``root`` (see :func:`is_user_file`)."""
    try:
        file = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a builtin, or a class made at run time without a file
        return False
    return file is not None and is_user_file(Path(file).resolve(), root)


def user_methods(objects: Iterable[object], root: Path) -> list[MethodSource]:
    """The training-path methods that classes of ``objects`` define in the user's files under ``root``."""
    found: list[MethodSource] = []
    for obj in objects:
        for name in TRAINING_HOOKS:
            fn = getattr(type(obj), name, None)
            if fn is None:
                continue
            try:
                file = Path(inspect.getsourcefile(fn) or "").resolve()
                source = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if not is_user_file(file, root):
                continue  # defined by Lightning or another library, not by the user
            tree = _dump(source)
            if tree is not None:
                qual = fn.__qualname__.split(".")
                found.append(MethodSource(file, tuple(qual[:-1]), name, tree))
    return found


def recorded_tree(source: str, class_path: tuple[str, ...], name: str) -> str | None:
    """The syntax tree dump of method ``name`` of class ``class_path`` in a file's ``source``."""
    try:
        body: list[ast.stmt] = ast.parse(source).body
    except SyntaxError:
        return None
    for part in class_path:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        body = cls.body
    fn = next((n for n in body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name), None)
    return ast.dump(fn) if fn is not None else None


def changed_training_path(current: Iterable[MethodSource], read_recorded: Callable[[Path], str | None]) -> list[str]:
    """Names (``Class.method``) of training-path methods that differ from the recorded code.

    Args:
        current: the methods as they are now (see :func:`user_methods`).
        read_recorded: returns the recorded text of a file, or None if it did not exist.
    """
    changed = []
    cache: dict[Path, str | None] = {}
    for m in current:
        if m.file not in cache:
            cache[m.file] = read_recorded(m.file)
        text = cache[m.file]
        before = recorded_tree(text, m.class_path, m.name) if text is not None else None
        if before != m.tree:
            changed.append(".".join((*m.class_path, m.name)))
    return changed


def decide_training(
    settings: Mapping[str, Any],
    *,
    model: object,
    callbacks: Iterable[object],
    root: Path,
    read_recorded: Callable[[Path], str | None] | None,
    inside: str | None = "which checkpoints cannot reproduce",
) -> tuple[bool, str]:
    """Whether a replay re-trains, and why: new logging sits on the training path when the training-path
    methods of ``model`` and the project's own ``callbacks`` differ from the recorded code.

    Args:
        settings: the Trainer settings recorded with the run.
        model: the LightningModule to replay.
        callbacks: the Trainer's callbacks; those defined outside the project at ``root`` do not count.
        root: the project root.
        read_recorded: returns the recorded text of a file (None if it did not exist), or is None when
            the run has no code snapshot to compare with.
        inside: where the run validated inside its epochs, why its checkpoints cannot restore those
            validation points (None: they can, each has its checkpoint).
    """
    if settings.get("val_check_interval", 1.0) not in (1.0, None) and inside is not None:
        return True, f"validation ran inside the epoch (val_check_interval), {inside}"
    if read_recorded is None:
        return False, "the run has no code snapshot to compare with; restoring (pass train=True to re-train)"
    users = [model, *(cb for cb in callbacks if defined_in_project(type(cb), root))]
    changed = changed_training_path(user_methods(users, root), read_recorded)
    if changed:
        return True, f"the training path changed since the recording: {', '.join(changed)}"
    return False, "the training path is unchanged since the recording; only validation and epoch-end hooks run"
