"""Bad input and odd environments: a clear error (or warning) that says what to do, and nothing
written half-way. Real git repositories, real sqlite files, real checkpoint files."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import git, rows, user_git_state
from models import TRAIN_BATCHES, VAL_BATCHES, DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import ConfigError, FlorCallback, ReplayError, StoreError, codeversion, store
from flor_lightning.checkpoints import CheckpointStore
from flor_lightning.errors import CheckpointError
from flor_lightning.locate import locate
from flor_lightning.shadow import SHADOW_BRANCH

DB = Path(".flor") / "flor.db"


def fit(model: L.LightningModule | None = None, **overrides: object) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(**trainer_kwargs(**{"max_epochs": 1, **overrides}))
    trainer.fit(model or DigitsClassifier(), datamodule=DigitsData())
    return trainer


def flor_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith("flor_lightning") and r.levelno >= logging.WARNING
    ]


class CountingSteps(DigitsClassifier):
    steps = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def assert_nothing_recorded(root: Path, flor_home: Path) -> None:
    """No store, no shadow branch, no checkpoint folder: the failed start left no trace."""
    assert not (root / DB).exists()
    assert not list(flor_home.rglob("*.ckpt"))
    if (root / ".git").exists():
        assert not git(root, "branch", "--list", SHADOW_BRANCH)


# ---- git: none, empty, detached, dirty -------------------------------------------------------------


@pytest.mark.integration
def test_no_git_repository_records_without_a_snapshot_and_warns_once(
    no_git_project: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codeversion, "_warned_no_git", False)  # once per process: start afresh
    caplog.set_level(logging.WARNING)

    fit()
    fit()

    runs = flor.runs()
    assert list(runs["status"]) == ["finished", "finished"]
    assert runs["shadow_commit"].isna().all() and runs["head_commit"].isna().all()
    assert len(flor.records("train_loss")) == 2 * TRAIN_BATCHES
    (warning,) = [w for w in flor_warnings(caplog) if "git" in w]
    assert str(no_git_project) in warning and "without a code snapshot" in warning


def test_no_git_warning_says_what_to_do(
    no_git_project: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codeversion, "_warned_no_git", False)
    caplog.set_level(logging.WARNING)
    assert codeversion.commit_code(locate(), "flor run x", exclude={}) is None
    (warning,) = flor_warnings(caplog)
    assert "git init" in warning


@pytest.fixture
def empty_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flor_home: Path, git_env: None) -> Path:
    """``git init`` done, nothing committed yet; train.py is untracked."""
    root = tmp_path / "fresh"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("print('not committed yet')\n")
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [str(root / "train.py")])
    return root


@pytest.mark.integration
def test_repository_without_commits(empty_repo: Path) -> None:
    status = git(empty_repo, "status", "--porcelain", "--untracked-files=all")

    fit()

    (run,) = flor.runs().to_dict("records")
    assert run["status"] == "finished"
    assert run["head_commit"] is None and run["branch"] == "main"
    assert git(empty_repo, "show", f"{run['shadow_commit']}:train.py") == "print('not committed yet')"
    # the user's repository still has no commit, and the same status
    assert git(empty_repo, "rev-list", "--all").split() == [run["shadow_commit"]]
    assert git(empty_repo, "status", "--porcelain", "--untracked-files=all") == status


@pytest.mark.integration
def test_detached_head(project: Path) -> None:
    head = git(project, "rev-parse", "HEAD")
    git(project, "checkout", "-q", "--detach")

    fit()

    (run,) = flor.runs().to_dict("records")
    assert (run["head_commit"], run["branch"]) == (head, None)
    assert git(project, "rev-parse", f"{SHADOW_BRANCH}^{{commit}}") == run["shadow_commit"]
    assert git(project, "rev-parse", "HEAD") == head
    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=project).returncode == 1  # still detached


@pytest.mark.integration
def test_huge_untracked_file_is_left_out_and_named(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    (project / "train.py").write_text("print('edited')\n")
    with (project / "weights.bin").open("wb") as f:  # 6 MB, over the 5 MB default
        f.truncate(6 * 1024 * 1024)
    (project / "notes.md").write_text("small and untracked\n")
    before = user_git_state(project)

    fit()

    shadow = flor.runs()["shadow_commit"].iloc[0]
    files = set(git(project, "ls-tree", "-r", "--name-only", shadow).splitlines())
    assert files == {".gitignore", "train.py", "notes.md"}
    assert git(project, "show", f"{shadow}:train.py") == "print('edited')"
    assert any("weights.bin" in w and "left out" in w for w in flor_warnings(caplog))
    assert user_git_state(project) == before


def test_left_out_warning_says_what_to_do(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with (project / "weights.bin").open("wb") as f:
        f.truncate(6 * 1024 * 1024)
    codeversion.commit_code(locate(), "flor run x", exclude={})
    (warning,) = flor_warnings(caplog)
    assert ".gitignore" in warning and "max_file_bytes" in warning


# ---- where checkpoints go ----------------------------------------------------------------------------


@pytest.mark.integration
def test_flor_home_pointing_at_a_file(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "home-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("FLOR_HOME", str(a_file))
    CountingSteps.steps = 0

    with pytest.raises(ConfigError, match=r"FLOR_HOME=.*home-file.* is a file; it must be a folder"):
        fit(CountingSteps())

    assert CountingSteps.steps == 0
    assert a_file.read_text() == "not a folder"
    assert_nothing_recorded(project, tmp_path / "flor-home")


@pytest.mark.integration
@pytest.mark.parametrize(("url", "hint"), [("s3://bucket/x", "s3fs"), ("nosuch://x", "Protocol not known: nosuch")])
def test_checkpoint_url_whose_protocol_is_not_installed(project: Path, flor_home: Path, url: str, hint: str) -> None:
    CountingSteps.steps = 0
    L.seed_everything(0, verbose=False)
    with pytest.raises(
        ConfigError, match=rf"cannot use checkpoint location '{url}'.*{hint}.*Install the fsspec backend"
    ):
        trainer = flor.Trainer(callbacks=[FlorCallback(checkpoint_dir=url)], **trainer_kwargs(max_epochs=1))
        trainer.fit(CountingSteps(), datamodule=DigitsData())

    assert CountingSteps.steps == 0
    assert_nothing_recorded(project, flor_home)


@pytest.mark.parametrize("url", ["s3://bucket/x", "nosuch://x"])
def test_uninstalled_checkpoint_protocol_is_refused_at_construction(url: str) -> None:
    with pytest.raises(ConfigError, match="Install the fsspec backend"):
        FlorCallback(checkpoint_dir=url)


# ---- replay with nothing to replay ---------------------------------------------------------------


def test_replay_before_any_recording(project: Path, flor_home: Path) -> None:
    trainer = flor.Trainer(**trainer_kwargs())
    with pytest.raises(ReplayError, match=r"nothing to replay: no flor log store .*Record a run first"):
        trainer.replay(DigitsClassifier(), datamodule=DigitsData())
    assert_nothing_recorded(project, flor_home)

    store.connect(project / DB).close()  # a store, but no run of this script in it
    with pytest.raises(ReplayError, match=r"no recorded run of 'train.py' with checkpoints.*Record one first"):
        trainer.replay(DigitsClassifier(), datamodule=DigitsData())
    assert rows(project / DB, "SELECT * FROM replays") == []
    assert not git(project, "branch", "--list", SHADOW_BRANCH)


# ---- odd names and values ------------------------------------------------------------------------

ODD_NAMES = ["loss; DROP TABLE logs;--", "ü ñ 😀", "a'b\"c", "with spaces", "x) OR 1=1 --"]
ODD_VALUES = {"nan_value": math.nan, "inf_value": math.inf, "neg_inf_value": -math.inf}


class OddNames(DigitsClassifier):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        for i, name in enumerate(ODD_NAMES):
            self.log(name, float(batch_idx * 10 + i))
        for name, value in ODD_VALUES.items():
            self.log(name, value)
        return loss


@pytest.mark.integration
def test_odd_metric_names_and_non_finite_values_round_trip(project: Path) -> None:
    fit(OddNames())

    for i, name in enumerate(ODD_NAMES):
        table = flor.query(name)
        assert list(table[name]) == [float(b * 10 + i) for b in range(TRAIN_BATCHES)]
        assert list(flor.records(name)["name"]) == [name] * TRAIN_BATCHES
    table = flor.query(*ODD_VALUES)
    assert len(table) == TRAIN_BATCHES and all(table[name].dtype == "float64" for name in ODD_VALUES)
    assert table["nan_value"].isna().all()
    assert list(table["inf_value"]) == [math.inf] * TRAIN_BATCHES
    assert list(table["neg_inf_value"]) == [-math.inf] * TRAIN_BATCHES
    nan = flor.records("nan_value")["value"]  # stored as NaN, not missing: one row per logged value
    assert len(nan) == TRAIN_BATCHES and all(math.isnan(v) for v in nan)
    # the SQL-looking names were data: every table is still there and whole
    everything = flor.records()
    logged = TRAIN_BATCHES * (1 + len(ODD_NAMES) + len(ODD_VALUES)) + 1 + 2 * VAL_BATCHES + 2
    assert len(everything) == logged
    assert flor.query(where="`with spaces` >= 20")["with spaces"].tolist() == [23.0, 33.0]


# ---- a damaged or foreign log store ----------------------------------------------------------------


def damaged(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00garbage, not sqlite\xff" * 512)


def foreign(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("make", "why"), [(damaged, "file is not a database"), (foreign, "flor did not create")])
def test_damaged_or_foreign_store_is_a_store_error_that_says_what_to_do(project: Path, make, why: str) -> None:  # type: ignore[no-untyped-def]
    make(project / DB)
    before = (project / DB).read_bytes()
    for read in (flor.query, flor.runs, flor.records, flor.last_checkpoint):
        with pytest.raises(StoreError, match=rf"cannot open the flor log store .*flor\.db.*{why}.*move it aside"):
            read()
    assert (project / DB).read_bytes() == before
    assert sorted(p.name for p in (project / ".flor").iterdir()) == ["flor.db"]  # no -wal, no -journal left


@pytest.mark.integration
@pytest.mark.parametrize("make", [damaged, foreign])
def test_recording_into_a_damaged_store_fails_before_training(project: Path, flor_home: Path, make) -> None:  # type: ignore[no-untyped-def]
    make(project / DB)
    before = (project / DB).read_bytes()
    CountingSteps.steps = 0

    with pytest.raises(StoreError, match="move it aside"):
        fit(CountingSteps())

    assert CountingSteps.steps == 0
    assert (project / DB).read_bytes() == before
    assert not list(flor_home.rglob("*.ckpt"))


@pytest.mark.integration
def test_a_damaged_store_leaves_no_checkpoint_folder(project: Path, flor_home: Path) -> None:
    damaged(project / DB)
    with pytest.raises(StoreError):
        fit()
    assert not flor_home.exists() or not any(flor_home.rglob("*"))


# ---- a checkpoint crafted to run code --------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.integration
def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(project: Path, tmp_path: Path) -> None:
    run_id = fit().flor.run_id
    db = project / DB
    (indexed,) = rows(db, "SELECT path FROM checkpoints WHERE run_id = ? AND epoch = 0", (run_id,))
    path = Path(indexed["path"])
    marker = tmp_path / "pwned"
    crafted = {
        "raw pickle": pickle.dumps({"state_dict": Exploit(marker)}),
        "torch zip": _torch_saved({"state_dict": {"w": torch.zeros(2)}, "loops": Exploit(marker)}, tmp_path),
    }
    for kind, data in crafted.items():
        path.write_bytes(data)  # an attacker who can write the file can update the index too
        digest = hashlib.sha256(data).hexdigest()
        conn = store.connect(db)
        store.update(conn, "checkpoints", {"run_id": run_id, "epoch": 0}, {"sha256": digest, "size": len(data)})
        conn.close()

        with pytest.raises(CheckpointError, match=r"cannot be read as a flor checkpoint.*Weights only load failed"):
            CheckpointStore(str(path.parent.parent)).load(str(path), digest)
        assert not marker.exists(), kind

    # replay meets it too: names it, works around it from the initial state, and runs nothing
    L.seed_everything(0, verbose=False)
    report = flor.Trainer(**trainer_kwargs(max_epochs=1)).replay(DigitsClassifier(), datamodule=DigitsData())
    assert report.bad_checkpoints == [0]
    assert report.mismatched == 0 and report.matched > 0
    assert not marker.exists()


def _torch_saved(obj: object, tmp_path: Path) -> bytes:
    path = tmp_path / "crafted.pt"
    torch.save(obj, path)
    return path.read_bytes()
