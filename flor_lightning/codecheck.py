"""Does a replay need to re-train? Compare the training-path code now with the recorded version.

New logging in ``validation_step`` or an epoch-end hook can be replayed from checkpoints;
new logging in ``training_step``, ``forward`` or a batch/optimizer hook needs the training
batches to run again. The comparison is on syntax trees, so comments and formatting do not
count as changes.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

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


def user_methods(objects: Iterable[object], root: Path) -> list[MethodSource]:
    """The training-path methods that classes of ``objects`` define in files under ``root``."""
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
            if root not in file.parents:
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
