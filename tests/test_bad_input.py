"""Bad input and odd environments: a clear error (or warning) that says what to do, and nothing
written half-way. Real git repositories, real sqlite files, real checkpoint files."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch
from conftest import TRAIN_SCRIPT
from helpers import git, rows, user_git_state
from models import TRAIN_BATCHES, VAL_BATCHES, DigitsClassifier, DigitsData, trainer_kwargs

import flor_lightning as flor
from flor_lightning import ConfigError, FlorCallback, ReplayError, StoreError
from flor_lightning import _cli as cli
from flor_lightning import _codeversion as codeversion
from flor_lightning import _store as store
from flor_lightning._checkpoints import CheckpointStore
from flor_lightning._errors import CheckpointError
from flor_lightning._locate import locate
from flor_lightning._shadow import SHADOW_BRANCH

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
    assert not list(flor_home.rglob("*.manifest")) and not list(flor_home.rglob("*.safetensors"))
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
    assert not list(flor_home.rglob("*.manifest")) and not list(flor_home.rglob("*.safetensors"))


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

        with pytest.raises(CheckpointError, match=r"cannot be read as a flor manifest.*Weights only load failed"):
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


# ---- a partly damaged, read-only or misplaced log store ------------------------------------------


def damage_pages(path: Path, *, first: int = 4, count: int = 5, seed: int = 3) -> None:
    """What ``dd if=/dev/urandom of=flor.db bs=4096 seek=3 count=5 conv=notrunc`` does, with seeded bytes:
    pages 4-8 (the runs and replays tables, the first page of the values) overwritten, the header intact."""
    with path.open("r+b") as f:
        f.seek((first - 1) * 4096)
        f.write(random.Random(seed).randbytes(count * 4096))


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.endswith("\n") and "Traceback" not in text


@pytest.mark.integration
def test_a_partly_damaged_store_is_a_one_line_store_error_and_nothing_is_recorded(
    project: Path, flor_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit()
    db = project / DB
    tip = git(project, "rev-parse", SHADOW_BRANCH)
    folders = sorted(p.name for p in (flor_home / "proj").iterdir())
    damage_pages(db)
    damaged_bytes = db.read_bytes()

    for command in (["runs"], ["query"], ["query", "val_loss", "--format", "json"], ["show", "x"]):
        assert cli.main(command) == 1, command
        err = capsys.readouterr().err
        assert one_line(err) and "flor.db" in err and "malformed" in err and "move it aside" in err, err
    for read in (flor.query, flor.runs, flor.records):
        with pytest.raises(StoreError, match=r"flor\.db.*malformed.*move it aside"):
            read()
    CountingSteps.steps = 0
    with pytest.raises(StoreError, match=r"flor\.db.*malformed.*move it aside") as recording:
        fit(CountingSteps())
    assert "\n" not in str(recording.value)
    assert CountingSteps.steps == 0
    with pytest.raises(StoreError, match=r"flor\.db.*malformed"):
        flor.Trainer(**trainer_kwargs(max_epochs=1)).replay(DigitsClassifier(), datamodule=DigitsData(), run="x")
    assert git(project, "rev-parse", SHADOW_BRANCH) == tip  # no code snapshot
    assert sorted(p.name for p in (flor_home / "proj").iterdir()) == folders  # no checkpoint folder
    assert db.read_bytes() == damaged_bytes


def as_other_user(argv: list[str]) -> list[str]:
    """``argv`` run by a user the store's permissions bind: this one, or, for root (whom they do not
    bind), nobody through setpriv."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no user to whom a read-only file is read-only")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path lies in a folder only its owner can)."""
    path = Path(tempfile.mkdtemp(prefix="flor-readonly-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def other_user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOR_DB"}
    config = home / "gitconfig"
    if not config.exists():
        config.write_text("[safe]\n\tdirectory = *\n")
        config.chmod(0o644)
    return env | {"HOME": str(home), "GIT_CONFIG_GLOBAL": str(config), "GIT_CONFIG_NOSYSTEM": "1"}


def small_store(db: Path) -> None:
    conn = store.connect(db)
    row = {"run_id": "r1", "project": "p", "script": "train.py", "started": 1.0, "status": "finished"}
    store.insert(conn, "runs", row | {"hparams": {"lr": 0.1}})
    conn.close()
    writer = store.LogWriter(lambda: store.connect(db), interval=60)
    for epoch in range(3):
        writer.add(("r1", None, "validate", "epoch", epoch, 4 * epoch + 4, None, "val_loss", 1.0 / (epoch + 1)))
    writer.add(("r1", None, "validate", "epoch", 2, 12, None, "big", math.inf))
    writer.close()


@pytest.mark.parametrize("read_only", ["file", "file and folder"])
def test_a_read_only_store_stays_queryable(open_dir: Path, read_only: str) -> None:
    """An archived store (file 444, folder 555 too) reads as it is; what would write says why it cannot."""
    db = open_dir / ".flor" / "flor.db"
    small_store(db)
    db.chmod(0o444)
    if read_only == "file and folder":
        db.parent.chmod(0o555)
    before = sorted(os.listdir(db.parent))
    env = other_user_env(open_dir)

    def flor_as_other(*args: str) -> subprocess.CompletedProcess[str]:
        argv = as_other_user([sys.executable, "-m", "flor_lightning", *args, "--db", str(db)])
        return subprocess.run(argv, capture_output=True, text=True, cwd=open_dir, env=env)

    done = flor_as_other("runs")
    assert done.returncode == 0 and "r1" in done.stdout and "finished" in done.stdout, done.stderr
    done = flor_as_other("query", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [r["val_loss"] for r in json.loads(done.stdout)] == [1.0, 0.5, 1 / 3]
    done = flor_as_other("show", "r1")
    assert done.returncode == 0 and "lr: 0.1" in done.stdout, done.stderr
    code = f"import flor_lightning as flor; print(len(flor.query(db={str(db)!r})), len(flor.records(db={str(db)!r})))"
    done = subprocess.run(as_other_user([sys.executable, "-c", code]), capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["3", "4"], done.stderr

    done = flor_as_other("gc", "--keep-last", "0")
    assert done.returncode == 1 and one_line(done.stderr), done.stderr
    assert "is read-only" in done.stderr and "chmod u+w" in done.stderr and "move it aside" not in done.stderr
    if read_only == "file and folder":
        assert sorted(os.listdir(db.parent)) == before  # reading left nothing beside it


CHILD = """
import json, sys
import lightning as L
import flor_lightning as flor
from models import DigitsClassifier, DigitsData, trainer_kwargs

out = {}
for what in ("record", "replay"):
    L.seed_everything(0)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=1))
    try:
        if what == "record":
            trainer.fit(DigitsClassifier(), datamodule=DigitsData())
        else:
            trainer.replay(DigitsClassifier(), datamodule=DigitsData(), run=sys.argv[1])
        out[what] = "no error"
    except flor.StoreError as err:
        out[what] = str(err)
print(json.dumps(out))
"""


@pytest.mark.integration
def test_recording_or_replaying_into_a_read_only_store_stops_before_anything_is_made(
    open_dir: Path, monkeypatch: pytest.MonkeyPatch, git_env: None
) -> None:
    root, home = open_dir / "proj", open_dir / "flor-home"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text(TRAIN_SCRIPT)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [str(root / "train.py")])
    monkeypatch.setenv("FLOR_HOME", str(home))
    run_id = fit().flor.run_id
    tip = git(root, "rev-parse", SHADOW_BRANCH)
    if os.geteuid() == 0:  # the files belong to the user who tries again, as a user's own project does
        for p in [open_dir, *open_dir.rglob("*")]:
            os.chown(p, 65534, 65534, follow_symlinks=False)
    (root / DB).chmod(0o444)
    (open_dir / "child.py").write_text(CHILD)
    env = other_user_env(open_dir)
    env |= {
        "FLOR_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    }

    argv = as_other_user([sys.executable, str(open_dir / "child.py"), run_id])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.splitlines()[-1])
    for what in ("record", "replay"):
        assert "is read-only" in errors[what] and "chmod u+w" in errors[what] and "\n" not in errors[what], errors
    # neither made a code snapshot (the repository now belongs to the other user: git asks to be told it is safe)
    assert git(root, "-c", "safe.directory=*", "rev-parse", SHADOW_BRANCH) == tip
    assert sorted(p.name for p in (home / "proj").iterdir()) == sorted([run_id, "packs"])  # nor a checkpoint folder
    assert rows(root / DB, "SELECT count(*) AS n FROM replays")[0]["n"] == 0


@pytest.mark.integration
def test_flor_db_under_a_regular_file_is_one_line_and_records_nothing(
    project: Path, flor_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("FLOR_DB", str(a_file / "flor.db"))
    CountingSteps.steps = 0
    with pytest.raises(StoreError, match=r"cannot create the folder .*a-file.*Point FLOR_DB") as err:
        fit(CountingSteps())
    assert "\n" not in str(err.value) and CountingSteps.steps == 0
    assert a_file.read_text() == "not a folder"
    assert not git(project, "branch", "--list", SHADOW_BRANCH)
    assert not flor_home.exists() or not any(flor_home.rglob("*"))


@pytest.mark.integration
def test_flor_db_in_a_folder_of_the_user_leaves_its_gitignore_alone(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only flor's own .flor/ folder gets a .gitignore of '*': anywhere else it would hide the user's files."""
    git(project, "rm", "-q", ".gitignore")
    git(project, "commit", "-q", "-m", "no .gitignore")
    for folder in (project, project / "stores"):
        monkeypatch.setenv("FLOR_DB", str(folder / "runs.db"))
        fit()
        assert (folder / "runs.db").exists() and not (folder / ".gitignore").exists()
    monkeypatch.delenv("FLOR_DB")
    fit()
    assert (project / ".flor" / ".gitignore").read_text().splitlines()[-1] == "*"


# ---- checkpoints that are gone -------------------------------------------------------------------


@pytest.mark.integration
def test_memory_checkpoints_warn_and_a_later_process_re_trains(
    project: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    url = f"memory://flor-ck-{uuid.uuid4().hex[:8]}"
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(callbacks=[FlorCallback(checkpoint_dir=url)], **trainer_kwargs(max_epochs=2))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    run_id = trainer.flor.run_id
    (warning,) = [w for w in flor_warnings(caplog) if "memory" in w]
    assert url in warning and "vanish when it exits" in warning
    assert cli.main(["show", run_id, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"]["where"] == [f"memory:///{url[9:]}/{run_id}"]

    fsspec.filesystem("memory").rm(f"/{url[9:]}", recursive=True)  # what another process finds there: nothing
    with pytest.warns(UserWarning, match=r"no checkpoint left to restore from: they were kept in memory://.*went"):
        L.seed_everything(0, verbose=False)
        report = flor.Trainer(**trainer_kwargs(max_epochs=2)).replay(DigitsClassifier(), datamodule=DigitsData())
    assert report.epochs_trained == [0, 1] and report.epochs_restored == []
    assert report.mismatched == 0 and report.matched == report.rederived > 0  # re-trained from the start, exactly


@pytest.mark.integration
def test_replay_with_every_checkpoint_gone_re_trains_and_says_where_they_were(project: Path, flor_home: Path) -> None:
    """FLOR_HOME deleted, then the index freed by gc: replay says so and re-trains from the model passed in
    (the README's promise for runs freed by gc), in one segment; sequential segments cannot and say why."""
    run_id = fit(max_epochs=2).flor.run_id
    shutil.rmtree(flor_home)
    for why, kwargs in [("their files are gone", {"run": run_id}), ("flor gc freed them", {})]:
        with pytest.warns(UserWarning, match=rf"run {run_id} has no checkpoint left to restore from: {why}.*expected"):
            L.seed_everything(0, verbose=False)
            trainer = flor.Trainer(**trainer_kwargs(max_epochs=2))
            report = trainer.replay(DigitsClassifier(), datamodule=DigitsData(), **kwargs)
        assert report.epochs_trained == [0, 1] and report.mismatched == 0 and report.matched == report.rederived > 0
        flor.gc(keep_last=0)
    with pytest.raises(ReplayError, match="segments=1"):
        flor.Trainer(**trainer_kwargs(max_epochs=2)).replay(DigitsClassifier(), datamodule=DigitsData(), segments=2)


# ---- replay arguments ----------------------------------------------------------------------------


@pytest.mark.integration
def test_replay_arguments_are_checked_before_anything_and_positional_data_works_as_for_fit(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = fit(max_epochs=2).flor.run_id
    db = project / DB
    tip = git(project, "rev-parse", SHADOW_BRANCH)
    for epochs, message in [(5, "epochs=\\[5\\]"), ("abc", "list or range"), ([1.5], "1.5"), ([True], "True")]:
        with pytest.raises(ReplayError, match=message):
            flor.Trainer(**trainer_kwargs(max_epochs=2)).replay(
                DigitsClassifier(), datamodule=DigitsData(), epochs=epochs
            )  # type: ignore[arg-type]
    assert rows(db, "SELECT count(*) AS n FROM replays")[0]["n"] == 0
    assert git(project, "rev-parse", SHADOW_BRANCH) == tip

    with pytest.warns(UserWarning, match=r"hyperparameters differ from run .*: dropout=0\.5 \(recorded 0\.2\)"):
        L.seed_everything(0, verbose=False)
        changed = flor.Trainer(**trainer_kwargs(max_epochs=2)).replay(DigitsClassifier(dropout=0.5), DigitsData())
    assert changed.epochs_restored == [0, 1]  # restoring: dropout is off in validation, so values still match

    dm = DigitsData()
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=2))
    trainer.fit(DigitsClassifier(), dm.train_dataloader(), dm.val_dataloader())
    L.seed_everything(0, verbose=False)
    trainer = flor.Trainer(**trainer_kwargs(max_epochs=2))
    report = trainer.replay(DigitsClassifier(), dm.train_dataloader(), dm.val_dataloader(), train=True)
    assert report.run_id == trainer.flor.run_id != run_id
    assert report.epochs_trained == [0, 1] and report.mismatched == 0 and report.matched == report.rederived > 0


# ---- the command line on bad names, conditions and values ----------------------------------------


def test_query_names_conditions_and_json_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "flor.db"
    small_store(db)
    assert cli.main(["query", "nosuchname", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "no values logged under 'nosuchname'" in err and "big, val_loss" in err
    for where in ("lr", "val_loss"):
        assert cli.main(["query", "--where", where, "--db", str(db)]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and "is no condition" in err and "e.g. 'lr < 0.01'" in err, err
    assert cli.main(["runs", "--where", "lr", "--db", str(db)]) == 2
    assert "--where 'lr' is no condition" in capsys.readouterr().err
    assert cli.main(["query", "--where", "val_loss >", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert one_line(err) and "cannot evaluate where='val_loss >'" in err

    assert cli.main(["query", "--format", "json", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "Infinity" not in text and "NaN" not in text
    values = json.loads(text)
    assert [r["big"] for r in values] == [None, None, "inf"]  # NaN (no value) is null, infinity a string
