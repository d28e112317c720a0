"""The ``flor`` command line, run as a subprocess against a store made by real recordings.

Each ``flor`` process imports torch and Lightning (several seconds here), so the commands that
only format what is stored are also driven in-process through ``cli.main``; every command is
run at least once as its own process.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pandas as pd
import pytest
from helpers import git, rows
from models import trainer_kwargs

import flor_lightning as flor
from flor_lightning import _cli as cli

pytestmark = pytest.mark.integration

MODEL_SOURCE = (Path(__file__).parent / "models.py").read_text()
VAL_CONF = (
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())',
    'self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())\n'
    '        self.log(f"{prefix}_conf", logits.softmax(1).max(1).values.mean())',
)
WIDER = ("nn.Linear(64, hidden), nn.ReLU()", "nn.Linear(64, hidden), nn.GELU()")
_names = itertools.count()


def load_model(root: Path) -> ModuleType:
    """Import ``root/model.py`` afresh, as a new process running the edited script would."""
    name = f"flor_cli_model_{next(_names)}"
    spec = importlib.util.spec_from_file_location(name, root / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def edit_model(root: Path, old: str, new: str) -> None:
    path = root / "model.py"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))


# The project's script: what `flor replay` runs again inside each version's worktree.
TRAIN_SCRIPT = f"""\
import sys

import lightning as L

import flor_lightning as flor
from model import DigitsClassifier, DigitsData

lr = float(sys.argv[sys.argv.index("--lr") + 1])
L.seed_everything(7)
trainer = flor.Trainer(**{trainer_kwargs()!r})
trainer.fit(DigitsClassifier(lr=lr), datamodule=DigitsData())
"""


def record(root: Path, mp: pytest.MonkeyPatch, *, lr: float) -> str:
    """Record ``root/model.py`` as ``python train.py --lr LR`` would (in this process); return the run id."""
    mp.setattr(sys, "argv", [str(root / "train.py"), "--lr", str(lr)])
    m = load_model(root)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs())
    trainer.fit(m.DigitsClassifier(lr=lr), datamodule=m.DigitsData())
    return str(trainer.flor.run_id)


def replay(root: Path, run_id: str, *, lr: float) -> Any:
    m = load_model(root)
    L.seed_everything(7)
    trainer = flor.Trainer(**trainer_kwargs())
    return trainer.replay(m.DigitsClassifier(lr=lr), datamodule=m.DigitsData(), run=run_id)


def new_project(base: Path) -> Path:
    """A git repository holding the test model, committed, as a user's project."""
    root = base / "proj"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text(TRAIN_SCRIPT)
    (root / "model.py").write_text(MODEL_SOURCE)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


def isolate(mp: pytest.MonkeyPatch, base: Path, root: Path) -> None:
    """What conftest's ``project`` fixture does, for a fixture that outlives one test."""
    config = base / "gitconfig"
    config.write_text("")
    mp.setenv("GIT_CONFIG_GLOBAL", str(config))
    mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        mp.setenv(f"GIT_{role}_NAME", "Test User")
        mp.setenv(f"GIT_{role}_EMAIL", "test@example.com")
    mp.setenv("FLOR_HOME", str(base / "flor-home"))
    mp.delenv("FLOR_DB", raising=False)
    mp.chdir(root)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """Two recorded runs of different code and lr, the second replayed with a new metric.

    Returns (project root, run A id, run B id); A: lr 0.01 with ReLU, B: lr 0.001 with GELU.
    """
    base = tmp_path_factory.mktemp("cli")
    root = new_project(base)
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, base, root)
        run_a = record(root, mp, lr=0.01)
        edit_model(root, *WIDER)
        git(root, "commit", "-qam", "GELU")
        run_b = record(root, mp, lr=0.001)
        edit_model(root, *VAL_CONF)
        report = replay(root, run_b, lr=0.001)
        assert report.new_names == ["val_conf"]
        yield root, run_a, run_b


def flor_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``flor ARGS`` as its own process (``python -m flor_lightning``)."""
    env = {k: v for k, v in os.environ.items() if k != "FLOR_DB"}
    return subprocess.run(
        [sys.executable, "-m", "flor_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def flor_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runs_table_as_a_process(recorded: tuple[Path, str, str]) -> None:
    root, run_a, run_b = recorded
    done = flor_cmd("runs", cwd=root)
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split()[:6] == ["run_id", "started", "status", "script", "commit", "hparams"]
    assert "final metrics" in header
    assert [line.split()[0] for line in lines[:-1]] == [run_a, run_b]  # oldest first
    shadow = flor.runs().set_index("run_id").loc[run_a, "shadow_commit"]
    assert shadow[:8] in lines[0] and "finished" in lines[0] and "train.py" in lines[0]
    assert "  lr=0.01 hidden=32" in lines[0] and "  lr=0.001 hidden=32" in lines[1]  # what differs comes first
    final_acc = flor.query("val_acc", run=run_a)["val_acc"].dropna().iloc[-1]
    assert f"val_acc={final_acc:.4g}" in lines[0]
    assert header.split()[-1] == "checkpoints" and lines[0].split()[-2:][1] in ("KB", "MB")
    on_disk = sum(p.stat().st_size for p in (Path(os.environ["FLOR_HOME"]) / "proj").rglob("*") if p.is_file())
    assert (
        lines[-1] == f"project proj: {cli._human(on_disk)} of checkpoints on disk (blobs shared by runs counted once)"
    )


def test_runs_where_and_json_have_every_hparam_and_final_metric(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, run_a, run_b = recorded
    code, out, _ = flor_in_process(capsys, "runs", "--where", "lr < 0.005", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["run_id"] for r in rows] == [run_b]
    assert rows[0]["lr"] == 0.001 and rows[0]["hidden"] == 32
    epochs = flor.query("val_loss", run=run_b).dropna(subset=["val_loss"])
    assert rows[0]["val_loss"] == epochs["val_loss"].iloc[-1]
    assert "val_conf" not in rows[0]  # only replayed, never recorded: not a final recorded metric
    code, out, _ = flor_in_process(capsys, "runs", "--format", "csv")
    assert code == 0 and pd.read_csv(io.StringIO(out))["run_id"].tolist() == [run_a, run_b]


def test_query_csv_as_a_process_matches_flor_query(recorded: tuple[Path, str, str]) -> None:
    root, _, run_b = recorded
    done = flor_cmd(
        "query", "val_loss", "val_conf", "--run", run_b, "--where", "epoch >= 1", "--format", "csv", cwd=root
    )
    assert done.returncode == 0, done.stderr
    got = pd.read_csv(io.StringIO(done.stdout))
    want = flor.query("val_loss", "val_conf", run=run_b, where="epoch >= 1")
    assert got["step"].tolist() == want["step"].tolist()
    assert got["val_conf"].dropna().tolist() == pytest.approx(want["val_conf"].dropna().tolist(), rel=1e-12)
    assert sorted(set(got["epoch"])) == [1, 2]


def test_query_parquet_needs_out_and_writes_it(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = flor_in_process(capsys, "query", "val_loss", "--format", "parquet")
    assert code == 2 and "--out" in err
    out = tmp_path / "v.parquet"
    code, _, _ = flor_in_process(capsys, "query", "val_loss", "--replayed", "--format", "parquet", "--out", str(out))
    assert code == 0
    assert pd.read_parquet(out)["val_loss"].notna().sum() == flor.query("val_loss")["val_loss"].notna().sum()


def test_show_as_a_process(recorded: tuple[Path, str, str]) -> None:
    root, _, run_b = recorded
    done = flor_cmd("show", run_b, "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    run = flor.runs().set_index("run_id").loc[run_b]
    assert info["hparams"]["lr"] == 0.001
    assert info["settings"]["max_epochs"] == 3
    assert info["code"] == {"shadow_commit": run["shadow_commit"], "head_commit": run["head_commit"], "branch": "main"}
    home = Path(os.environ["FLOR_HOME"]) / "proj" / run_b
    files = sorted(home.glob("*.manifest"))
    assert info["checkpoints"]["count"] == len(files) == 4  # initial state and 3 epochs
    assert info["checkpoints"]["epochs"] == "0-2"
    rows_b = rows(root / ".flor" / "flor.db", "SELECT size, packs FROM checkpoints WHERE run_id = ?", (run_b,))
    packs = {home.parent / p for r in rows_b for p in json.loads(r["packs"])}
    assert info["checkpoints"]["bytes"] == sum(r["size"] for r in rows_b)  # what run B added to the store
    # what replaying it reads: its manifests and every pack they reference, run A's shared ones included
    assert info["checkpoints"]["bytes needed"] == sum(f.stat().st_size for f in [*files, *packs])
    assert info["checkpoints"]["bytes needed"] > info["checkpoints"]["bytes"]
    assert info["checkpoints"]["where"] == [str(home)]
    (replay_info,) = info["replays"]
    assert replay_info["status"] == "finished"
    assert replay_info["report"]["new_names"] == ["val_conf"] and replay_info["report"]["mismatched"] == 0


def test_show_table_names_the_replay_and_its_fidelity(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, run_b = recorded
    code, out, _ = flor_in_process(capsys, "show", run_b)
    assert code == 0
    assert "hparams:\n" in out and "  lr: 0.001" in out and "checkpoints:\n" in out
    replay_line = next(line for line in out.splitlines() if line.startswith(f"  {run_b}.r"))
    assert "finished" in replay_line and "new names: val_conf" in replay_line and "mismatched 0" in replay_line


def test_diff_as_a_process_shows_code_and_hparams(recorded: tuple[Path, str, str]) -> None:
    root, run_a, run_b = recorded
    done = flor_cmd("diff", run_a, run_b, cwd=root)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    hparams, code = out.split("code: git diff", 1)
    assert "lr" in hparams and "0.01" in hparams and "0.001" in hparams
    assert "hidden" not in hparams  # equal in both
    assert "-        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU()" in code
    assert "+        self.net = nn.Sequential(nn.Linear(64, hidden), nn.GELU()" in code
    assert "val_conf" not in code  # the edit after run B is in neither snapshot


def test_unknown_run_exits_1_and_usage_errors_exit_2(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_a, _ = recorded
    done = flor_cmd("show", "no-such-run", cwd=root)
    assert done.returncode == 1
    latest = [recorded[2], run_a]  # newest first: run b was recorded after run a
    assert done.stderr.strip() == (
        f"flor: unknown run id 'no-such-run'; the latest runs are {latest} (`flor runs` or flor.runs() lists every one)"
    )
    assert flor_in_process(capsys, "diff", run_a, "nope")[0] == 1
    assert flor_in_process(capsys, "query", "--run", "nope")[0] == 1
    code, _, err = flor_in_process(capsys, "query", "--where", "no_such_column > 1")
    assert code == 2 and "cannot evaluate" in err and "Traceback" not in err
    code, _, err = flor_in_process(capsys, "runs", "--where", "lr <")
    assert code == 2 and "cannot evaluate --where" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["runs", "--format", "xml"])
    assert exit_info.value.code == 2


def test_no_store_exits_1_with_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = flor_in_process(capsys, "runs", "--db", str(tmp_path / "none.db"))
    assert code == 1 and "no flor log store" in err and "Record a run first" in err


@pytest.mark.parametrize("command", ["runs", "query", "show", "diff", "replay", "gc", "push", "plot"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flor {command}") and "--db" in out


def test_console_script_is_installed() -> None:
    """``pip install`` puts ``flor`` next to the interpreter ([project.scripts] in pyproject.toml)."""
    script = Path(sys.executable).parent / "flor"
    if not script.exists():
        pytest.skip("flor_lightning is not pip-installed in this environment (pip install -e .)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "gc" in done.stdout and "push" in done.stdout


def test_replay_command_reports_and_sets_the_exit_code(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_a, run_b = recorded
    done = flor_cmd("replay", "--where", "lr < 0.005", "--format", "json", cwd=root)
    rows = json.loads(done.stdout)  # progress goes to stderr: stdout is the json alone
    assert [r["run_id"] for r in rows] == [run_b], done.stderr
    assert rows[0]["status"] == "replayed" and rows[0]["mismatched"] == 0, rows[0]
    assert done.returncode == 0
    code, _, err = flor_in_process(capsys, "replay", "--run", run_a, "--run", "nope")
    assert code == 1 and "unknown run" in err  # nothing replayed


def test_replay_command_runs_versions_on_a_dask_scheduler_named_by_workers(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from distributed import LocalCluster

    run_b = recorded[2]
    # one worker thread in this process: the scheduler is reached by its address, as a remote one would be
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        code, out, err = flor_in_process(
            capsys, "replay", "--run", run_b, "--workers", cluster.scheduler_address, "--format", "json"
        )
    [row] = json.loads(out)
    assert code == 0 and row["status"] == "replayed" and row["mismatched"] == 0, err
    assert "sent to ClientExecutor" in err


def test_replay_workers_that_name_nothing_are_refused(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = flor_in_process(capsys, "replay", "--workers", "the-cluster")
    assert code != 0 and "is not a count, a dask scheduler address" in err
    code, _, err = flor_in_process(capsys, "replay", "--workers", "2", "--parallel", "2")
    assert code != 0 and "not both" in err


class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_leaves_early_is_not_an_error(
    recorded: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flor query | head -1`: the pipe closes under flor's output."""
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(["query", "val_loss"]) == 0
    assert capsys.readouterr().err == ""


def test_show_json_is_strict_json_with_infinite_hparams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON has no Infinity or NaN: `flor show --format json` writes them as "inf" and null, which
    every JSON parser reads (Python's own would accept the bare tokens; jq and browsers do not)."""
    from flor_lightning import _store as store

    db = tmp_path / "flor.db"
    conn = store.connect(db)
    hparams = {"max_norm": float("inf"), "floor": float("-inf"), "decay": float("nan"), "lr": 0.1}
    row = {"run_id": "r1", "project": "p", "started": 1.0, "status": "finished", "hparams": hparams}
    store.insert(conn, "runs", row)
    conn.close()
    code, out, err = flor_in_process(capsys, "show", "r1", "--format", "json", "--db", str(db))
    assert code == 0, err

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    info = json.loads(out, parse_constant=refuse)
    assert info["hparams"] == {"max_norm": "inf", "floor": "-inf", "decay": None, "lr": 0.1}


def test_merge_of_a_one_node_replay_finds_no_node_store_and_of_an_unknown_one_names_the_latest(
    recorded: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, run_b = recorded
    # the module's recordings are replayed by other tests too: any of run B's replays ran on one node
    replay = rows(root / ".flor" / "flor.db", "SELECT replay_id FROM replays WHERE run_id = ? LIMIT 1", (run_b,))[0]
    code, _, err = flor_in_process(capsys, "merge", replay["replay_id"])
    assert code == 1 and f"replay {replay['replay_id']} has no node store under " in err
    assert f"/{run_b}/replays/{replay['replay_id']}" in err

    done = flor_cmd("merge", "nope", cwd=root)  # as its own process
    assert done.returncode == 1 and "holds no replay 'nope'; the latest are [" in done.stderr
    probe = "import sys, flor_lightning._nodes; print('torch' in sys.modules)"  # what merge adds to the CLI
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_the_command_line_starts_without_torch() -> None:
    """runs/query/show/diff/merge/gc/push import neither torch nor Lightning (the README says so): _housekeeping
    took torch in through _blobs and _checkpoints for a folder name and a path split, now in _locate."""
    probe = "import sys, flor_lightning._cli; print('torch' in sys.modules, 'lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.split() == ["False", "False"], done.stderr
