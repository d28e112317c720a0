"""Replaying past runs from their own code versions: selection, propagation, probes, worktrees.

The end-to-end tests share one project (recorded once per module): three versions of a
training script, each recorded as a real run with its own code and learning rate. The
current working tree then adds a ``val_conf`` metric to ``validation_step`` (uncommitted,
as a user would) and holds a probe callback file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from helpers import git, rows, user_git_state
from lightning.pytorch.callbacks import Callback

import flor_lightning as flor
from flor_lightning import _multiversion as multiversion
from flor_lightning import _propagate as merging
from flor_lightning._errors import ConfigError, UnknownRunError

SCRIPT = """
import argparse
import lightning as L
import probes  # the version's own probes module: the probe given to replay must not be taken from it
from torch.nn import functional as F
import flor_lightning as flor
from model import DigitsClassifier, DigitsData, trainer_kwargs

HIDDEN = {hidden}


class Version(DigitsClassifier):
    def __init__(self, lr):
        super().__init__(hidden=HIDDEN, lr=lr)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        {val_loss}


parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
args = parser.parse_args()
L.seed_everything(0)
recorder = flor.FlorCallback()
trainer = {trainer}(callbacks=[recorder], **trainer_kwargs(max_epochs=2))
trainer.fit(Version(args.lr), datamodule=DigitsData())
print("RUN", recorder.run_id)
"""
VAL_LOSS = 'self.log("val_loss", F.cross_entropy(logits, y))'
# (hidden units, the val_loss line, learning rate, Trainer) of the three recorded versions: the
# first changed the very line the new metric is added below, so merging the new metric conflicts
# there; the second records with a plain Lightning Trainer and a FlorCallback.
VERSIONS = [
    (16, 'self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)', 0.05, "flor.Trainer"),
    (24, VAL_LOSS, 0.01, "L.Trainer"),
    (32, VAL_LOSS, 0.005, "flor.Trainer"),
]
NEW_METRIC = VAL_LOSS + '\n        self.log("val_conf", logits.softmax(1).max(1).values.mean())'

PROBE = """
from lightning.pytorch.callbacks import Callback


class WeightNorm(Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("{name}", sum(p.detach().norm() for p in pl_module.parameters()))
"""


def _script(hidden: int, val_loss: str, trainer: str) -> str:
    return SCRIPT.format(hidden=hidden, val_loss=val_loss, trainer=trainer)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The project with three recorded versions; returns the root, the environment and the run ids."""
    tmp = tmp_path_factory.mktemp("multiversion")
    root = tmp / "proj"
    root.mkdir()
    (tmp / "gitconfig").write_text("")
    env = {
        **os.environ,
        "FLOR_HOME": str(tmp / "flor-home"),
        "GIT_CONFIG_GLOBAL": str(tmp / "gitconfig"),
        "GIT_CONFIG_NOSYSTEM": "1",
        **{f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "T"), ("EMAIL", "t@x"))},
    }
    env.pop("FLOR_DB", None)

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    sh("git", "init", "-q", "-b", "main")
    (root / "model.py").write_text((Path(__file__).parent / "models.py").read_text())
    (root / ".gitignore").write_text("__pycache__/\nlightning_logs/\n")
    (root / "probes.py").write_text(PROBE.format(name="old_probe"))  # same module and class name as today's
    run_ids = []
    for i, (hidden, val_loss, lr, trainer) in enumerate(VERSIONS):
        (root / "train.py").write_text(_script(hidden, val_loss, trainer))
        sh("git", "add", ".")
        sh("git", "commit", "-q", "-m", f"version {i + 1}")
        out = sh(sys.executable, "train.py", "--lr", str(lr))
        run_ids.append(next(line.split()[1] for line in out.splitlines() if line.startswith("RUN ")))
    # today's edits: a new metric, uncommitted, and a probe file
    train = root / "train.py"
    train.write_text(train.read_text().replace(VAL_LOSS, NEW_METRIC))
    (root / "probes.py").write_text(PROBE.format(name="probe_weight_norm"))
    return {"root": root, "env": env, "runs": run_ids}


@pytest.fixture
def project_env(recorded: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = recorded["root"]
    assert isinstance(root, Path)
    env = recorded["env"]
    assert isinstance(env, dict)
    for key in ("FLOR_HOME", "GIT_CONFIG_GLOBAL", "GIT_CONFIG_NOSYSTEM", "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("GIT_COMMITTER_NAME", env["GIT_COMMITTER_NAME"])
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", env["GIT_COMMITTER_EMAIL"])
    monkeypatch.chdir(root)
    yield root


def _values(db: Path, name: str) -> dict[str, int]:
    counts = rows(db, "SELECT run_id, count(*) AS n FROM logs WHERE name = ? GROUP BY run_id", (name,))
    return {r["run_id"]: r["n"] for r in counts}


def _worktrees(root: Path) -> list[str]:
    return [line for line in git(root, "worktree", "list", "--porcelain").splitlines() if line.startswith("worktree ")]


# ---- end to end ---------------------------------------------------------------------------


@pytest.mark.integration
def test_new_metric_is_propagated_and_replayed_over_the_selected_versions(recorded, project_env):
    root, (v1, v2, v3) = project_env, recorded["runs"]
    before = user_git_state(root)
    shadow_before = git(root, "rev-list", "--count", "flor.shadow")
    lines: list[str] = []

    results = flor.replay_runs("lr < 0.02", parallel=2, echo=lines.append)

    assert [r.run_id for r in results] == [v2, v3]
    for r in results:
        assert (r.status, r.merge) == ("replayed", "merged"), r
        assert r.epochs_restored == [0, 1] and r.epochs_trained == []
        assert r.new_names == ["val_conf"]
        assert r.matched > 0 and r.mismatched == 0
        assert r.log is not None and Path(r.log).is_file()
    db = root / ".flor" / "flor.db"
    conf = _values(db, "val_conf")
    assert set(conf) == {v2, v3} and v1 not in conf  # present for the two selected versions only
    recorded_loss = rows(
        db, "SELECT run_id, count(*) AS n FROM logs WHERE name = 'val_loss' AND replay_id IS NULL GROUP BY run_id"
    )
    assert conf == {r["run_id"]: r["n"] for r in recorded_loss if r["run_id"] in (v2, v3)}  # a value per val_loss
    # the replayed values are each version's own: the models differ, so do the values
    df = flor.query("val_conf", run=[v2, v3])
    assert df.groupby("run_id")["val_conf"].apply(tuple).nunique() == 2
    # every replay snapshot its merged code onto flor.shadow; the user's side is untouched
    assert int(git(root, "rev-list", "--count", "flor.shadow")) == int(shadow_before) + 2
    replays = rows(
        db,
        "SELECT run_id, status, shadow_commit FROM replays WHERE replay_id IN (?, ?)",
        (results[0].replay_id, results[1].replay_id),
    )
    assert {r["status"] for r in replays} == {"finished"}
    merged = git(root, "show", f"{replays[0]['shadow_commit']}:train.py")
    assert "val_conf" in merged
    assert user_git_state(root) == before
    assert len(_worktrees(root)) == 1
    assert sum("replaying from version" in line for line in lines) == 2
    assert sum(": replayed (merged)" in line for line in lines) == 2
    table = flor.format_report(results)
    assert v2 in table and v3 in table and "val_conf" in table


@pytest.mark.integration
def test_a_version_whose_code_conflicts_with_the_edit_is_skipped_and_named(recorded, project_env):
    root, (v1, _, _) = project_env, recorded["runs"]
    before = user_git_state(root)
    replays_before = rows(root / ".flor" / "flor.db", "SELECT count(*) AS n FROM replays")[0]["n"]

    [result] = flor.replay_runs(runs=[v1], echo=lambda _: None)

    assert (result.status, result.merge) == ("skipped", "conflict")
    assert "train.py" in result.reason
    assert result.replay_id is None
    assert rows(root / ".flor" / "flor.db", "SELECT count(*) AS n FROM replays")[0]["n"] == replays_before
    assert user_git_state(root) == before
    assert len(_worktrees(root)) == 1


@pytest.mark.integration
def test_a_probe_from_today_replays_an_old_version_without_merging(recorded, project_env):
    root, (v1, _, _) = project_env, recorded["runs"]
    before = user_git_state(root)

    [result] = flor.replay_runs(runs=[v1], probe="probes.py:WeightNorm", propagate=False, echo=lambda _: None)

    assert (result.status, result.merge) == ("replayed", "probe only"), result
    assert result.new_names == ["probe_weight_norm"]  # today's probes.py, not the version's own
    assert result.epochs_restored == [0, 1] and result.mismatched == 0
    assert _values(root / ".flor" / "flor.db", "probe_weight_norm") == {v1: 2}  # one per epoch, this run only
    assert "val_conf" not in set(flor.records(run=v1)["name"])  # nothing merged into that version
    assert user_git_state(root) == before
    assert len(_worktrees(root)) == 1


@pytest.mark.integration
def test_a_failing_version_is_reported_with_its_log(recorded, project_env, tmp_path):
    root, (_, v2, _) = project_env, recorded["runs"]
    broken = tmp_path / "broken.py"
    broken.write_text(
        "from lightning.pytorch.callbacks import Callback\n\n\nclass Broken(Callback):\n"
        "    def on_validation_epoch_end(self, trainer, pl_module):\n"
        "        raise RuntimeError('probe failure injected by the test')\n"
    )

    [result] = flor.replay_runs(runs=[v2], probe=f"{broken}:Broken", propagate=False, echo=lambda _: None)

    assert result.status == "failed"
    assert "probe failure injected by the test" in result.reason
    assert result.log is not None and "probe failure injected" in Path(result.log).read_text()
    assert len(_worktrees(root)) == 1
    assert f"log of {v2}" in flor.format_report([result])


@pytest.mark.integration
def test_a_replay_past_its_timeout_is_killed_and_reported(recorded, project_env):
    root, (_, v2, _) = project_env, recorded["runs"]

    [result] = flor.replay_runs(runs=[v2], timeout=0.5, echo=lambda _: None)

    assert (result.status, result.reason) == ("failed", "timed out after 0.5s and was killed")
    assert len(_worktrees(root)) == 1


KILL_ONCE = """
import os
import signal
from pathlib import Path
from lightning.pytorch.callbacks import Callback


class KillOnce(Callback):
    \"\"\"Logs a norm; the first replay to reach epoch 1 (the marker file says which) kills the worker running it.\"\"\"

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("probe_norm", sum(p.detach().norm() for p in pl_module.parameters()))
        marker = Path({marker!r})
        if trainer.current_epoch == 1 and ({always} or not marker.exists()):
            marker.touch()
            os.kill(os.getppid(), signal.SIGKILL)  # the parent: the executor's worker process
"""


def _kill_probe(tmp_path: Path, *, always: bool) -> str:
    probe = tmp_path / "kill_once.py"
    probe.write_text(KILL_ONCE.format(marker=str(tmp_path / "killed"), always=always))
    return f"{probe}:KillOnce"


def _duplicates(db: Path, replay_id: str) -> int:
    key = "run_id, replay_id, stage, level, epoch, step, batch_idx, name"
    sql = f"SELECT count(*) AS n FROM (SELECT {key} FROM logs WHERE replay_id = ? GROUP BY {key} HAVING count(*) > 1)"
    return int(rows(db, sql, (replay_id,))[0]["n"])


@pytest.mark.integration
def test_versions_replay_on_a_dask_cluster_and_a_killed_worker_is_retried_recording_nothing_twice(
    recorded, project_env, tmp_path
):
    from distributed import Client, LocalCluster

    root, (_, v2, v3) = project_env, recorded["runs"]
    db = root / ".flor" / "flor.db"
    lines: list[str] = []
    probe = _kill_probe(tmp_path, always=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        results = flor.replay_runs(
            runs=[v2, v3], probe=probe, propagate=False, executor=client.get_executor(), echo=lines.append
        )

    assert (tmp_path / "killed").exists()  # one worker was killed mid-replay and its task ran again
    assert [r.run_id for r in results] == [v2, v3]
    for r in results:
        assert (r.status, r.merge, r.new_names) == ("replayed", "probe only", ["probe_norm"]), r
        assert r.matched > 0 and r.mismatched == 0
        assert _duplicates(db, r.replay_id) == 0
        [norms] = rows(db, "SELECT count(*) AS n FROM logs WHERE replay_id = ? AND name = 'probe_norm'", (r.replay_id,))
        assert norms["n"] == len(r.epochs_restored) == 2  # one per validation epoch
        assert rows(db, "SELECT status FROM replays WHERE replay_id = ?", (r.replay_id,)) == [{"status": "finished"}]
    # every task's log holds its replay's output (the killed try's lines, when it printed any before the kill,
    # come first: the log is appended to; under load the kill can come before the announcement)
    assert all(Path(r.log).read_text().count("replaying run") >= 1 for r in results)
    assert sum("sent to ClientExecutor" in line for line in lines) == 2
    assert len(_worktrees(root)) == 1

    # a task run again after it finished (its worker died before answering) replays nothing
    before = rows(db, "SELECT count(*) AS n FROM logs")
    [row] = rows(db, "SELECT * FROM runs WHERE run_id = ?", (v2,))
    task = multiversion.VersionTask(
        row, root, db, None, None, 1, None, (), None, results[0].replay_id, tmp_path / "again.log"
    )
    again = multiversion.replay_version(task)
    assert (again.status, again.replay_id, again.matched) == ("replayed", results[0].replay_id, results[0].matched)
    assert "not run again" in again.reason
    assert rows(db, "SELECT count(*) AS n FROM logs") == before


@pytest.mark.integration
def test_a_task_whose_worker_dies_is_reported_failed_with_its_log(recorded, project_env, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    v2 = recorded["runs"][1]
    probe = _kill_probe(tmp_path, always=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        [result] = flor.replay_runs(runs=[v2], probe=probe, propagate=False, executor=pool, echo=lambda _: None)

    assert result.status == "failed"
    assert "BrokenProcessPool" in result.reason
    assert result.log is not None and "replaying run" in Path(result.log).read_text()
    assert f"log of {v2}" in flor.format_report([result])


SCALED = """
import lightning as L
import torch
import flor_lightning as flor
from model import DigitsClassifier, DigitsData, trainer_kwargs

SCALE = float(open("../data/scale.txt").read())  # an ignored file, so not in the code snapshot


class Scaled(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x * SCALE), y)
        self.log("train_loss", loss)
        return loss


L.seed_everything(0)
trainer = flor.Trainer(**trainer_kwargs(max_epochs=2))
trainer.fit(Scaled(), datamodule=DigitsData())
"""


@pytest.mark.integration
def test_new_logging_on_the_training_path_retrains_and_shared_files_reach_the_version(project):
    exp = project / "exp"  # the script runs from its own folder: a path relative to it must work in replay
    exp.mkdir()
    (exp / "model.py").write_text((Path(__file__).parent / "models.py").read_text())
    (exp / "train.py").write_text(SCALED)
    (project / ".gitignore").write_text("*.log\ndata/\n")
    (project / "data").mkdir()
    (project / "data" / "scale.txt").write_text("0.5\n")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "scaled inputs")
    done = subprocess.run([sys.executable, "train.py"], cwd=exp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert flor.runs()[["script", "cwd"]].values.tolist() == [["exp/train.py", "exp"]]
    train = exp / "train.py"
    line = 'self.log("train_loss", loss)'
    train.write_text(train.read_text().replace(line, line + '\n        self.log("train_x2", loss.detach() * 2)'))

    [missing] = flor.replay_runs(echo=lambda _: None)
    [result] = flor.replay_runs(share=["data"], echo=lambda _: None)

    assert missing.status == "failed" and "data/scale.txt" in missing.reason, missing
    assert (result.status, result.merge) == ("replayed", "merged"), result
    # the merged training_step differs from the run's version there: its epochs are trained again
    assert result.epochs_trained == [0, 1] and result.epochs_restored == []
    assert result.new_names == ["train_x2"]
    assert result.matched > 0 and result.mismatched == 0  # re-training reproduces the recording bit for bit
    assert len(_worktrees(project)) == 1


# ---- selection and arguments (no Trainer in this process) ----------------------------------


def _table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "started": pd.to_datetime([3, 1, 2], unit="s"),
            "status": ["finished"] * 3,
            "script": ["train.py"] * 3,
            "shadow_commit": ["s1", "s2", "s3"],
            "lr": [0.05, 0.01, 0.005],
        }
    )


def test_where_selects_runs_oldest_first():
    assert multiversion.select_runs(_table(), "lr < 0.02", None) == ["b", "c"]
    assert multiversion.select_runs(_table(), None, None) == ["b", "c", "a"]
    assert multiversion.select_runs(_table(), "lr < 0.02", ["a", "b"]) == ["b"]
    assert multiversion.select_runs(_table(), None, "a") == ["a"]


def test_a_where_that_matches_nothing_names_the_columns():
    with pytest.raises(ConfigError, match=r"matches none of the runs that can be replayed.*Columns: .*\blr\b"):
        multiversion.select_runs(_table(), "lr > 1", None)
    with pytest.raises(ConfigError, match=r"cannot evaluate where='nope > 1'.*Columns"):
        multiversion.select_runs(_table(), "nope > 1", None)
    with pytest.raises(UnknownRunError, match=r"unknown run id 'zz'; the latest runs are \["):
        multiversion.select_runs(_table(), None, ["zz"])
    with pytest.raises(ConfigError, match=r"runs=\[\] selects nothing"):
        multiversion.select_runs(_table(), None, [])


def test_bad_arguments_are_refused_before_anything_runs(project):
    with pytest.raises(ConfigError, match="parallel must be"):
        flor.replay_runs(parallel=0)
    with pytest.raises(ConfigError, match=r"executor must be a concurrent\.futures\.Executor"):
        flor.replay_runs(executor="tcp://127.0.0.1:8786")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train must be"):
        flor.replay_runs(train="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="probe must be"):
        flor.replay_runs(probe="no-colon")
    with pytest.raises(ConfigError, match="does not exist"):
        flor.replay_runs(probe="missing.py:Probe")
    (project / "p.py").write_text("class NotACallback:\n    pass\n")
    with pytest.raises(ConfigError, match="not a lightning Callback"):
        flor.replay_runs(probe="p.py:NotACallback")
    with pytest.raises(ConfigError, match="share paths are relative"):
        flor.replay_runs(share=["/abs"])
    with pytest.raises(ConfigError, match="timeout must be"):
        flor.replay_runs(timeout=0)
    with pytest.raises(ConfigError, match=r"share paths \['data'\] do not exist"):
        flor.replay_runs(share=["data"])


def test_runs_that_cannot_be_replayed_say_why(project):
    head = git(project, "rev-parse", "HEAD")
    ok = {"shadow_commit": head, "script": "train.py"}
    assert multiversion._unfit(ok, True, "finished") is None
    assert "no code snapshot" in (multiversion._unfit({**ok, "shadow_commit": None}, True, "finished") or "")
    assert multiversion._unfit(ok, False, "finished") == "no checkpoints"
    assert multiversion._unfit(ok, True, "running") == "still recording"
    assert "not inside the repository" in (multiversion._unfit({**ok, "script": "/x/t.py"}, True, "crashed") or "")
    assert multiversion._missing_commit(project, head) is None
    assert "not in this repository" in (multiversion._missing_commit(project, "1" * 40) or "")


class _ModuleLevelProbe(Callback):
    pass


def test_a_probe_class_is_referenced_by_its_file_and_name():
    ref = multiversion.probe_reference(_ModuleLevelProbe)
    assert ref == f"{Path(__file__).resolve()}:_ModuleLevelProbe"

    class Local(Callback):
        pass

    with pytest.raises(ConfigError, match="define it at module level"):
        multiversion.probe_reference(Local)
    in_script = type("InScript", (Callback,), {"__module__": "__main__"})
    with pytest.raises(ConfigError, match="define it in its own module"):
        multiversion.probe_reference(in_script)


def test_a_probe_hooking_the_training_path_asks_for_retraining():
    from flor_lightning._version_runner import probe_trains

    class OnBatch(Callback):
        def on_train_batch_end(self, *args: object) -> None:
            pass

    class OnValidation(Callback):
        def on_validation_epoch_end(self, *args: object) -> None:
            pass

    assert probe_trains(OnBatch) and not probe_trains(OnValidation)


# ---- the 3-way merge ----------------------------------------------------------------------


def test_three_way_takes_the_edit_where_the_version_did_not_change():
    merge = merging.git_merge_file
    assert merging.three_way(b"a\n", b"a\n", b"a\nb\n", merge) == (b"a\nb\n", False)
    assert merging.three_way(b"x\n", b"a\n", b"a\n", merge) == (b"x\n", False)  # nothing to bring
    assert merging.three_way(None, None, b"new\n", merge) == (b"new\n", False)  # a new file
    assert merging.three_way(b"a\n", b"a\n", None, merge) == (None, False)  # a deleted file


def test_three_way_merges_separate_changes_and_refuses_overlapping_ones():
    base = b"".join(b"line %d\n" % i for i in range(10))
    ours = base.replace(b"line 1\n", b"line one\n")
    theirs = base.replace(b"line 8\n", b"line 8\nadded\n")
    merged, conflict = merging.three_way(ours, base, theirs, merging.git_merge_file)
    assert not conflict and merged == ours.replace(b"line 8\n", b"line 8\nadded\n")
    clash = base.replace(b"line 8\n", b"line eight\n")
    assert merging.three_way(clash, base, theirs, merging.git_merge_file)[1] is True
    assert merging.three_way(None, base, theirs, merging.git_merge_file)[1] is True  # deleted vs changed
    assert merging.three_way(b"\0bin1", b"\0bin0", b"\0bin2", merging.git_merge_file)[1] is True


def test_binary_files_are_not_brought_in(project):
    (project / "model.ckpt").write_bytes(b"\0weights")
    git(project, "add", "model.ckpt")
    git(project, "commit", "-q", "-m", "a tracked binary file")
    base = git(project, "rev-parse", "HEAD")
    (project / "model.ckpt").write_bytes(b"\0weights, trained further")
    (project / "untracked.ckpt").write_bytes(b"\0an output, not code")
    (project / "train.py").write_text("print('edited')\n")
    edits = merging.edits_since(project, base)
    assert "untracked.ckpt" not in edits.paths  # an untracked binary file is never part of the code
    worktree = project.parent / "version"
    git(project, "worktree", "add", "-q", "--detach", str(worktree), base)
    try:
        merged = merging.merge_into(worktree, base, edits)
        assert (merged.written, merged.binary, merged.status) == (("train.py",), ("model.ckpt",), "merged")
        assert (worktree / "model.ckpt").read_bytes() == b"\0weights" and not (worktree / "untracked.ckpt").exists()
        assert (worktree / "train.py").read_text() == "print('edited')\n"
    finally:
        git(project, "worktree", "remove", "--force", str(worktree))


def test_edits_since_lists_what_a_snapshot_would_take(project):
    base = git(project, "rev-parse", "HEAD")
    (project / "train.py").write_text("changed\n")
    (project / "new.py").write_text("x = 1\n")
    (project / "ignored.log").write_text("ignored by .gitignore\n")
    edits = merging.edits_since(project, base)
    assert sorted(edits.paths) == ["new.py", "train.py"]
    with pytest.raises(flor.GitError, match="not a commit"):
        merging.edits_since(project, "0" * 40)


# ---- only code is propagated: logs beside it are never merged ------------------------------

LOGGED = """
import sys
import lightning as L
import yaml
from torch.nn import functional as F
import flor_lightning as flor
from model import DigitsClassifier, DigitsData, trainer_kwargs

CONF = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))


class Logged(DigitsClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))


L.seed_everything(0)
trainer = flor.Trainer(**trainer_kwargs(max_epochs=2))
trainer.fit(Logged(lr=CONF["lr"]), datamodule=DigitsData())
print("RUN", trainer.flor.run_id)
"""


@pytest.mark.integration
def test_runs_recorded_with_their_output_redirected_into_the_repo_all_replay(project):
    (project / "model.py").write_text((Path(__file__).parent / "models.py").read_text())
    (project / "train.py").write_text(LOGGED)
    (project / ".gitignore").write_text("__pycache__/\n")  # the logs are not ignored, as in many projects
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "train")
    (project / "conf.yaml").write_text("lr: 0.01\n")  # untracked, named on the command line
    run_ids = []
    for log in ("r1.log", "r2.log"):  # python train.py --config conf.yaml > r1.log 2>&1
        with (project / log).open("w") as out:
            cmd = [sys.executable, "train.py", "--config", "conf.yaml"]
            done = subprocess.run(cmd, cwd=project, stdout=out, stderr=subprocess.STDOUT, timeout=300, check=False)
        text = (project / log).read_text()
        assert done.returncode == 0, text[-3000:]
        run_ids.append(next(line.split()[1] for line in text.splitlines() if line.startswith("RUN ")))
    train = project / "train.py"
    train.write_text(train.read_text().replace(VAL_LOSS, NEW_METRIC))
    (project / "conf.yaml").write_text("lr: 0.01  # tuned in run 1\n")

    results = flor.replay_runs(echo=lambda _: None)

    assert [r.run_id for r in results] == run_ids
    for r in results:
        assert (r.status, r.merge) == ("replayed", "merged"), r
        assert r.reason == "merged conf.yaml, train.py; left out (not code): r2.log", r
        assert r.left_out == ["r2.log"]
        assert r.new_names == ["val_conf"] and r.epochs_restored == [0, 1] and r.mismatched == 0 < r.matched
    shadows = [
        rows(project / ".flor" / "flor.db", "SELECT shadow_commit FROM runs WHERE run_id = ?", (r,)) for r in run_ids
    ]
    trees = [set(git(project, "ls-tree", "-r", "--name-only", s[0]["shadow_commit"]).splitlines()) for s in shadows]
    assert "r1.log" not in trees[0] and "r2.log" not in trees[1]  # each run's own output is not its code


def test_named_configs_are_the_config_files_on_a_command_line(tmp_path):
    root = tmp_path / "p"
    argv = ["fit", "--config", "conf/a.yaml", "--trainer.max_epochs=3", "-c=b.yml", "../../outside.yaml", "data.csv"]
    assert merging.named_configs(argv, root / "exp", root) == ("exp/b.yml", "exp/conf/a.yaml")
    assert merging.named_configs([], root, root) == ()


def test_code_edits_are_tracked_files_python_source_and_named_configs():
    changed = ["train.py", "r2.log", "lightning_logs/version_0/metrics.csv", "data.txt", "conf.yaml", "new.py"]
    edits, rest = merging.code_edits(changed, tracked=["data.txt", "train.py"], configs=["conf.yaml"])
    assert edits == ("train.py", "data.txt", "conf.yaml", "new.py")
    assert rest == ("r2.log", "lightning_logs/version_0/metrics.csv")
    assert merging.summarize([*rest, "lightning_logs/version_1/metrics.csv"]) == "lightning_logs/ (2 files), r2.log"


def test_edits_since_leaves_out_what_is_not_code(project):
    base = git(project, "rev-parse", "HEAD")
    (project / "notes.txt").write_text("untracked text that is not named anywhere\n")
    (project / "conf.yaml").write_text("lr: 0.1\n")
    edits = merging.edits_since(project, base, configs=["conf.yaml"])
    assert (edits.paths, edits.left_out) == (("conf.yaml",), ("notes.txt",))
