"""``flor plot``: learning curves of real recordings (and a replay) rendered into a PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import flor_cmd, recorded

from flor_lightning import _cli as cli
from flor_lightning._errors import ConfigError
from flor_lightning._plot import curves, plot

pytestmark = pytest.mark.integration
__all__ = ["recorded"]  # the module-scoped fixture of test_cli: two runs, the second replayed with val_conf

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path, *, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 0
    with Image.open(path) as img:
        assert img.size == (width, height)
        pixels = np.asarray(img.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 10  # lines, text and axes, not a blank canvas


def test_plot_as_a_process_writes_a_png(recorded: tuple[Path, str, str], tmp_path: Path) -> None:
    root, _, _ = recorded
    out = tmp_path / "curves.png"
    done = flor_cmd("plot", "val_loss", "val_conf", "--out", str(out), cwd=root)
    assert done.returncode == 0, done.stderr
    assert_real_png(out, width=800, height=640)  # two panels of 8 x 3.2 inches at 100 dpi


def test_points_mark_recorded_and_replayed_values(recorded: tuple[Path, str, str]) -> None:
    _, run_a, run_b = recorded
    pts = curves(["val_loss", "val_conf"])
    recorded_loss = pts[(pts["name"] == "val_loss") & ~pts["replayed"]]
    assert sorted(recorded_loss["run_id"].unique()) == sorted([run_a, run_b])
    assert recorded_loss.groupby("run_id")["epoch"].apply(list).tolist() == [[0, 1, 2], [0, 1, 2]]
    conf = pts[pts["name"] == "val_conf"]
    assert conf["replayed"].all() and set(conf["run_id"]) == {run_b} and conf["epoch"].tolist() == [0, 1, 2]
    # the replay re-derived val_loss of run B: drawn as replayed points too, on the same values
    again = pts[(pts["name"] == "val_loss") & pts["replayed"]]
    assert set(again["run_id"]) == {run_b}
    assert again["value"].tolist() == recorded_loss[recorded_loss["run_id"] == run_b]["value"].tolist()


def test_step_axis_and_one_run(recorded: tuple[Path, str, str], tmp_path: Path) -> None:
    _, run_a, _ = recorded
    pts = curves(["train_loss"], run=[run_a], x="step")
    assert set(pts["run_id"]) == {run_a} and pts["step"].tolist() == list(range(12))  # 3 epochs of 4 batches
    out = plot(["train_loss"], tmp_path / "steps.png", run=[run_a], x="step")
    assert_real_png(out, width=800, height=320)


def test_bad_requests_say_what_to_do(
    recorded: tuple[Path, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="no numeric values of \\['nope'\\]"):
        plot(["nope"], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="x must be one of"):
        curves(["val_loss"], x="time")
    assert cli.main(["plot", "val_loss", "--run", "nope", "--out", str(tmp_path / "x.png")]) == 1
    assert "unknown run id 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_a_clear_error(
    recorded: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert cli.main(["plot", "val_loss", "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'flor_lightning[plot]'" in err and "Traceback" not in err
