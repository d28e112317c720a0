"""Fixtures shared by the tests: a throw-away git project, isolated from the user's setup."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import git
from zygote import Zygote, running

TRAIN_SCRIPT = """\
import lightning as L

print("the script a recorded run was started from")
"""


@pytest.fixture(autouse=True)
def _isolated_process_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what a Trainer changes process-wide: the seed variables and torch's deterministic mode."""
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(var, "")  # records the original value, so the delenv below is undone too
        monkeypatch.delenv(var)
    monkeypatch.delenv("FLOR_DB", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def flor_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``FLOR_HOME``: where checkpoints go (outside the project, as ``~/.flor`` is)."""
    home = tmp_path / "flor-home"
    monkeypatch.setenv("FLOR_HOME", str(home))
    return home


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A git identity from the environment and no user or system git configuration."""
    config = tmp_path / "gitconfig"
    config.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Test User")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "test@example.com")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flor_home: Path, git_env: None) -> Path:
    """A git repository with a committed ``train.py``; the working directory and ``sys.argv``
    are those of ``python train.py --epochs 3`` run in it."""
    root = tmp_path / "proj"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text(TRAIN_SCRIPT)
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [str(root / "train.py"), "--epochs", "3"])
    return root


@pytest.fixture
def no_git_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flor_home: Path) -> Path:
    """A plain folder, not inside any git repository, as the working directory."""
    root = tmp_path / "plain"
    root.mkdir()
    (root / "train.py").write_text(TRAIN_SCRIPT)
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [str(root / "train.py")])
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", os.fspath(tmp_path))
    return root


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    """A fork server with torch and Lightning imported: children that start in milliseconds."""
    with running(tmp_path_factory.mktemp("zygote") / "stderr.log") as server:
        yield server
