"""The benchmarks run end to end in smoke mode. Their numbers are not asserted: benchmarks are not timed tests."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_all_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # where run_all finds _harness, as when run as a script
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_run_all_smoke_prints_every_table_and_one_row_per_target(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    for header in (  # each benchmark's own tables, streamed through
        "## Recording overhead: flor_lightning vs plain Lightning",
        "| variant | epoch s, median [min-max] | overhead vs plain",
        "### Cost per `self.log` call",
        "## Replay speedup: time to a hindsight metric, flor replay vs retraining",
        "| variant | ideal speedup",
        "## Query speed: reading a log store back as a pivot",
        "## Benchmark results",
        "| comparison / target | measured: median [min-max] | target | verdict | details |",
    ):
        assert header in out
    assert "FAILED TO RUN" not in out
    results = (tmp_path / "RESULTS.md").read_text()
    assert results in out
    for row in (  # one row per target and per peer; a missing peer says SKIPPED, a ran one a ratio
        "| W1 record overhead per epoch, flor vs plain Lightning (",
        "| W1 flor's overhead ÷ ModelCheckpoint(every_n_epochs=1, save_top_k=-1)'s | ",
        "| W1 flor's overhead ÷ ModelCheckpoint + AsyncCheckpointIO's | ",
        "| W1 flor's overhead ÷ MLflow Lightning autolog (sqlite, checkpoint every epoch)'s | ",
        '| W1 the same with FlorCallback(checkpoint_every="auto") (2% budget), 3x the epochs, vs plain fits as long (',
        '| W1 flor (checkpoint_every="auto") overhead ÷ ModelCheckpoint\'s | ',
        "| W3 flor's added cost per `self.log` value, training thread (µs) | ",
        "| W3 CSVLogger (log_every_n_steps=1) cost per value ÷ flor's (both threads) | ",
        "| W3 mlflow.log_metric → sqlite cost per value ÷ flor's (both threads) | ",
        "| W3 flordb.log cost per value ÷ flor's (both threads) | ",
        "| W2 replay-1 (replay, 1 segment): speedup over retraining",
        "| W2 replay-2 vs replay-1: call",
        "| W4 full pivot of 480 values, 4 runs (s) | ",
    ):
        assert row in results
    targets = [ln for ln in results.splitlines() if ln.startswith("| W")]
    assert all(("PASS" in ln) != ("FAIL" in ln) or "| info |" in ln for ln in targets)  # a verdict, never both
    w1 = json.loads((tmp_path / "record_overhead.json").read_text())["w1"]
    assert {r["variant"] for r in w1} == {
        "plain",
        "flor",
        "plain_long",
        "flor_auto",
        "modelckpt",
        "modelckpt_async",
        "mlflow",
    }
    replays = json.loads((tmp_path / "replay_speedup.json").read_text())["runs"]
    assert {r["variant"] for r in replays} == {"record", "retrain", "replay-1", "replay-2", "replay-2-fork"}
    assert all(r["report"]["mismatched"] == 0 for r in replays if r["report"])  # replays stay exact


def test_update_readme_replaces_only_between_the_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_all = _run_all_module(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n## Benchmarks\nintro\n{run_all.BEGIN}\nold table\n{run_all.END}\n\n## Next\n")
    assert run_all.update_readme("| new | table |\n", readme)
    assert readme.read_text() == (
        f"# title\n\n## Benchmarks\nintro\n{run_all.BEGIN}\n| new | table |\n{run_all.END}\n\n## Next\n"
    )
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not run_all.update_readme("| new |\n", plain)
    assert plain.read_text() == "no markers\n"


def test_each_failed_target_gets_its_explanation_or_says_it_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_all = _run_all_module(monkeypatch)
    analysis = tmp_path / "ANALYSIS.md"
    analysis.write_text(
        "# Where the time goes\n\nProse.\n\n- w4_full: the ADBC fetch\n- w1_overhead: the writer\n- a note\n"
    )
    notes = run_all.where_the_time_goes(analysis)
    assert notes == {"w4_full": "the ADBC fetch", "w1_overhead": "the writer"}
    rows = [
        {"id": "w4_full", "comparison": "pivot", "measured": "2 s", "target": "≤ 1 s", "ok": False},
        {"id": "w4_one_metric", "comparison": "one", "measured": "0.1 s", "target": "-", "ok": None},
        {"id": "w9_new", "comparison": "new", "measured": "3", "target": "≤ 1", "ok": False},
        {"id": "w1_overhead", "comparison": "record", "measured": "+1%", "target": "≤ 2%", "ok": True},
    ]
    lines = run_all.explanations([{"bench": None, "targets": rows}], notes)
    assert lines[0] == "Where the time goes, for each FAIL:"
    assert lines[2:] == ["- w4_full: the ADBC fetch", "- w9_new: not yet profiled"]
    assert run_all.explanations([{"bench": None, "targets": rows[1:2] + rows[3:]}], notes) == []


def test_the_hand_written_analysis_is_read_from_the_results_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    run_all = _run_all_module(monkeypatch)
    notes = run_all.where_the_time_goes()  # benchmarks/results/ANALYSIS.md, which no benchmark writes
    assert {"w1_overhead", "w2_replay-1_ideal", "w4_full"} <= notes.keys()
    assert all(text.strip() for text in notes.values())


def smoke(tmp_path: Path, script: str, *, cwd: Path = ROOT, timeout: int = 600) -> tuple[Path, str, str]:
    """Run ``benchmarks/<script> --smoke``; its markdown output file, that file's text and its stdout."""
    out = tmp_path / f"{Path(script).stem}.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, out.read_text(), done.stdout


@pytest.mark.integration
def test_many_runs_smoke_replays_on_each_executor_and_prints_one_row_each(tmp_path: Path) -> None:
    out, text, _ = smoke(tmp_path, "many_runs.py", timeout=900)
    assert "## Many-run replay: 2 past runs" in text
    for variant in ("parallel=1", "parallel=2", "dask"):
        assert f"| {variant} | " in text and "SKIPPED" not in text
    raw = json.loads(out.with_suffix(".json").read_text())["results"]
    assert sorted(r["variant"] for r in raw) == ["dask", "parallel=1", "parallel=2"]
    assert all(r["runs"] == 2 for r in raw)


@pytest.mark.integration
def test_w6_frozen_backbone_smoke_prints_its_tables(tmp_path: Path) -> None:
    out, text, stdout = smoke(tmp_path, "w6_frozen_backbone.py")
    assert "## W6: fine-tuning a head on a frozen backbone" in text and text in stdout
    assert "| packs holding each backbone tensor, after both runs | 1-1 (1: stored once) |" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    runs = {r["run_id"] for r in raw["two_runs"]["checkpoints"]}
    assert len(runs) == 2 and {r["variant"] for r in raw["timed"]} == {"plain", "flor", "modelckpt"}


@pytest.mark.integration
def test_w5_step_replay_smoke_prints_its_tables(tmp_path: Path) -> None:
    out, text, _ = smoke(tmp_path, "w5_step_replay.py", cwd=ROOT / "benchmarks")
    assert "## W5: one epoch of 12 steps validating every 4" in text
    assert "| restore | " in text and "| retrain | " in text and "share of ideal" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert set(raw["replay_s"]) == {"restore", "retrain"} and raw["times"]["inside"] == 2
