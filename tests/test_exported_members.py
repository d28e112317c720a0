"""The public surface is pinned: nothing leaks out of the package by accident, nothing goes missing."""

from __future__ import annotations

import importlib
import pkgutil

import flor_lightning as flor

PUBLIC = [
    "BadCheckpoint",
    "BlobError",
    "CheckpointError",
    "CommandProblem",
    "ConfigError",
    "FlorCallback",
    "FlorError",
    "GitError",
    "LightningCLI",
    "RecordStats",
    "ReplayError",
    "ReplayReport",
    "StoreError",
    "Trainer",
    "UnknownRunError",
    "VersionReplay",
    "__version__",
    "export",
    "export_mlflow",
    "export_tensorboard",
    "format_report",
    "gc",
    "last_checkpoint",
    "push",
    "query",
    "records",
    "replay_runs",
    "runs",
]


def test_all_is_the_pinned_public_surface_sorted() -> None:
    assert flor.__all__ == PUBLIC == sorted(PUBLIC)


def test_every_exported_name_resolves_and_is_defined_by_flor() -> None:
    for name in PUBLIC:
        value = getattr(flor, name)
        if name != "__version__":
            assert value.__module__.startswith("flor_lightning."), name


def test_implementation_modules_are_private() -> None:
    modules = [m.name for m in pkgutil.iter_modules(flor.__path__)]
    assert modules and all(m.startswith("_") for m in modules), [m for m in modules if not m.startswith("_")]


def test_no_function_is_shadowed_by_its_module() -> None:
    importlib.import_module("flor_lightning._query")  # once imported, a module named `query` would replace the function
    assert callable(flor.query) and callable(flor.export)


def test_unknown_attributes_are_an_attribute_error() -> None:
    try:
        flor.store  # noqa: B018  # a private module is not reachable under its old public name
    except AttributeError as err:
        assert "has no attribute 'store'" in str(err)
    else:
        raise AssertionError("flor.store should not exist")
