"""Learning curves: chosen metrics per run against epoch or step, drawn with matplotlib (optional extra).

Recorded values are solid lines; values a replay stored are drawn as dashed lines with
``x`` markers, so a hindsight metric stands out from what the run logged itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from flor_lightning._errors import ConfigError
from flor_lightning._query import records

X_AXES = ("epoch", "step")


def curves(names: Sequence[str], *, run: Sequence[str] | None = None, x: str = "epoch", db: Any = None) -> pd.DataFrame:
    """The points to draw: one row per (run, name, replayed, x) with the value, numeric values only.

    With ``x="epoch"`` a name logged several times in an epoch (every step) keeps the epoch's
    last value; a replayed name keeps the latest replay's.
    """
    if x not in X_AXES:
        raise ConfigError(f"x must be one of {list(X_AXES)}, got {x!r}")
    if not names:
        raise ConfigError("name at least one logged metric to plot, e.g. val_loss (`flor query` lists them)")
    rec = records(*names, run=list(run) if run else None, db=db)
    rec = rec[pd.to_numeric(rec["value"], errors="coerce").notna()].copy()
    rec["value"] = rec["value"].astype("float64")
    rec["replayed"] = rec["replay_id"].notna()
    points = rec.drop_duplicates(["run_id", "name", "replayed", x], keep="last")
    return points[["run_id", "name", "replayed", x, "value"]].sort_values(["run_id", "name", "replayed", x])


def plot(
    names: Sequence[str],
    out: str | Path,
    *,
    run: Sequence[str] | None = None,
    x: str = "epoch",
    db: Any = None,
) -> Path:
    """Draw ``names`` for each run (default: every run) against ``x`` into the image file ``out``.

    One panel per metric, one line per run. The format follows ``out``'s suffix (png, svg, pdf).

    Example:
        >>> from flor_lightning._plot import plot
        >>> plot(["val_loss", "val_f1"], "curves.png")  # doctest: +SKIP

    Raises:
        ConfigError: matplotlib is not installed, ``x`` is not epoch/step, or none of ``names``
            has a numeric value in the chosen runs.
    """
    figure = _figure_class()
    points = curves(names, run=run, x=x, db=db)
    if points.empty:
        raise ConfigError(f"no numeric values of {list(names)} in the chosen runs; `flor query` lists what was logged")
    shown = [n for n in names if n in set(points["name"])]
    # A bare Figure (not pyplot): no global backend switch, no window, nothing left open.
    fig = figure(figsize=(8, 3.2 * len(shown)))
    axes = fig.subplots(len(shown), 1, squeeze=False)
    colors = {run_id: f"C{i % 10}" for i, run_id in enumerate(points["run_id"].unique())}  # same run, same colour
    for ax, name in zip(axes[:, 0], shown, strict=True):
        _draw(ax, points[points["name"] == name], name, x, colors)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    return out


def _draw(ax: Any, points: pd.DataFrame, name: str, x: str, colors: dict[str, str]) -> None:
    from matplotlib.ticker import MaxNLocator

    for run_id, run_points in points.groupby("run_id", sort=False):
        color = colors[str(run_id)]
        recorded = run_points[~run_points["replayed"]]
        replayed = run_points[run_points["replayed"]]
        if len(recorded):
            ax.plot(recorded[x], recorded["value"], "-o", color=color, markersize=3, label=f"{run_id}")
        if len(replayed):
            ax.plot(replayed[x], replayed["value"], "--x", color=color, markersize=7, label=f"{run_id} (replayed)")
    ax.set_title(name)
    ax.set_xlabel(x)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole numbers
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError(
            "flor plot needs matplotlib, which is not installed: pip install 'flor_lightning[plot]'"
        ) from err
    return Figure
