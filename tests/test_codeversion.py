"""The code snapshot holds code, not outputs: what a run leaves out, found from the Trainer at run time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from helpers import git, make_venv, rows
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from models import DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import _cli as cli
from flor_lightning._codeversion import FLOR_FILES, TRAINER_OUTPUT, exclusions, local_path


def test_exclusions_keep_only_folders_strictly_inside_the_project(tmp_path):
    root = tmp_path / "proj"
    got = exclusions(
        root,
        {
            "a": [root / "lightning_logs", root, tmp_path, tmp_path / "elsewhere"],
            "b": [root / "lightning_logs", root / "flor.db"],
        },
    )
    assert got == {"lightning_logs": "a", "flor.db": "b"}  # the first reason named stays


def test_local_paths_of_folders_and_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("ckpts") == (tmp_path / "ckpts").resolve()
    assert local_path(f"file://{tmp_path}/x") == (tmp_path / "x").resolve()
    assert local_path("s3://bucket/flor") is None and local_path("memory://x") is None and local_path(None) is None


# ---- a real project with every kind of output inside it ------------------------------------

CODE = {"train.py", "model.py", ".gitignore", "notes.md", "pkg/__init__.py", "pkg/mod.py", "assets/logo.png"}


def _trainer(**callback: object) -> flor.Trainer:
    L.seed_everything(0)
    kwargs = trainer_kwargs(max_epochs=1, enable_checkpointing=True)
    kwargs["logger"] = [CSVLogger(save_dir="."), CSVLogger(save_dir="logs", name="csv")]  # "." is the repo itself
    checkpoints = [ModelCheckpoint(dirpath="ckpts", every_n_train_steps=2), ModelCheckpoint()]
    return flor.Trainer(**kwargs, callbacks=[*checkpoints, flor.FlorCallback(**callback)])


def _fit(**callback: object) -> str:
    trainer = _trainer(**callback)
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return str(trainer.flor.run_id)


@pytest.mark.integration
def test_the_snapshot_holds_exactly_the_code_and_flor_show_names_the_rest(project, monkeypatch, capsys):
    (project / "model.py").write_text("MODEL = 1\n")
    (project / "assets").mkdir()
    (project / "assets" / "logo.png").write_bytes(b"\x89PNG\0\0tracked binary: the user chose to track it")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "code")
    (project / "notes.md").write_text("untracked text: code\n")
    (project / "pkg").mkdir()
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "mod.py").write_text("X = 1\n")
    (project / "pkg" / "__pycache__").mkdir()
    (project / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0bytecode")
    (project / "model.bin").write_bytes(b"\0\1weights")
    site = make_venv(project / ".venv")  # not in .gitignore
    (site / "library.py").write_text("class Library:\n    pass\n")
    monkeypatch.setenv("FLOR_HOME", str(project / "flor-home"))

    _fit()  # checkpoints under FLOR_HOME, inside the repository
    _fit(checkpoint_dir=str(project / "flor-ckpts"))
    second = _fit(checkpoint_dir=str(project / "flor-ckpts"))  # sees both checkpoint roots filled

    replay = _trainer(checkpoint_dir=str(project / "flor-ckpts")).replay(DigitsClassifier(), datamodule=DigitsData())

    db = project / ".flor" / "flor.db"
    runs = {r["run_id"]: r for r in rows(db, "SELECT * FROM runs")}
    [replayed] = rows(db, "SELECT shadow_commit FROM replays WHERE replay_id = ?", (replay.replay_id,))
    for commit in [*(r["shadow_commit"] for r in runs.values()), replayed["shadow_commit"]]:
        assert set(git(project, "ls-tree", "-r", "--name-only", commit).splitlines()) == CODE, commit
    left_out = json.loads(runs[second]["left_out"])
    assert left_out == {
        ".venv/": "virtualenv",
        "ckpts/": TRAINER_OUTPUT,
        "flor-ckpts/": FLOR_FILES,
        "flor-home/": FLOR_FILES,
        "lightning_logs/": TRAINER_OUTPUT,
        "logs/": TRAINER_OUTPUT,
        "model.bin": "untracked binary file",
        "pkg/__pycache__/": "bytecode cache",
    }
    assert any((project / "lightning_logs").rglob("*.ckpt")) and any((project / "ckpts").glob("*.ckpt"))
    assert any((project / "flor-home").rglob("*.manifest")) and any((project / "flor-ckpts").rglob("*.manifest"))
    assert cli.main(["show", second]) == 0
    out = capsys.readouterr().out
    shown = out[out.index("left out of the code snapshot:") :].splitlines()[1:9]
    assert "  lightning_logs/: written by the Trainer" in shown and "  .venv/: virtualenv" in shown


@pytest.mark.integration
def test_a_tracked_file_in_an_output_folder_goes_in(project):
    (project / "lightning_logs").mkdir()
    (project / "lightning_logs" / "README.md").write_text("what these logs are\n")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "documented logs")

    run_id = _fit()

    [run] = rows(project / ".flor" / "flor.db", "SELECT shadow_commit, left_out FROM runs WHERE run_id = ?", (run_id,))
    tree = set(git(project, "ls-tree", "-r", "--name-only", run["shadow_commit"]).splitlines())
    assert "lightning_logs/README.md" in tree
    assert not any(p.startswith("lightning_logs/version_") for p in tree)
    assert json.loads(run["left_out"])["lightning_logs/"] == TRAINER_OUTPUT


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_the_file_a_process_output_is_redirected_into_is_found(tmp_path):
    out = tmp_path / "r1.log"
    code = "import sys; from flor_lightning._codeversion import redirected_output as r; sys.stderr.write(str(r()))"
    with out.open("w") as stdout:
        done = subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=subprocess.PIPE, text=True)
    assert done.stderr == str([out.resolve()])
