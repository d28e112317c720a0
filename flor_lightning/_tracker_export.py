"""``flor export``: runs' recorded and hindsight values into TensorBoard event files and MLflow runs.

For a user who never attached a logger, or whose logger flor cannot write back to (W&B), a run
can still be opened in the UI they know. Per run, what is exported is what :func:`flor.query`
shows (:func:`export_values`): the recorded values, and for each name the recording lacks the
values of the latest replay that logged it (the hindsight metrics), one per name and recorded
step. Steps are flor's: the global step when the value was logged (Lightning's own loggers put
epoch-end values one step lower). Replayed values of names the recording has (re-derived ones)
are not exported: ``flor.query(replayed=True)`` shows them beside the recorded ones.

- TensorBoard (:func:`export_tensorboard`): a folder per run, ``<logdir>/<run_id>``, so the
  hindsight curves are tags of the run beside the recorded ones; its hyperparameters and shadow
  commit as the text ``flor``. Exporting again replaces the folder's earlier export file.
- MLflow (:func:`export_mlflow`): one MLflow run per flor run, in the experiment named after the
  run's project (or ``experiment``), hyperparameters as params, tags ``flor.run_id`` and
  ``flor.shadow_commit`` (also ``mlflow.source.git.commit``). Exporting again finds the run by
  its ``flor.run_id`` tag and adds only the values it lacks.

The writers are the libraries' own: ``torch.utils.tensorboard.SummaryWriter`` (needs
``tensorboard``) and ``MlflowClient.log_batch`` (needs ``mlflow-skinny``); the extras
``flor_lightning[tensorboard]`` and ``[mlflow]`` install them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from flor_lightning import _runs
from flor_lightning._errors import ConfigError
from flor_lightning._query import records, runs

EVENT_SUFFIX = ".flor"  # marks the event files flor's export wrote (an export replaces only those)
RUN_TAG = "flor.run_id"
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "crashed": "KILLED"}
_METRICS_PER_BATCH = 1000  # MLflow's limits for one log_batch call
_PARAMS_PER_BATCH = 100
_PARAM_LENGTH = 6000


@dataclass(frozen=True)
class Exported:
    """One run's export: where it went and how many values were written now (``replayed`` of them)."""

    run_id: str
    target: str
    where: str
    values: int
    replayed: int


def export_values(rec: pd.DataFrame) -> pd.DataFrame:
    """The numeric values to export, from :func:`flor.records` rows, in the order they were written.

    What :func:`flor.query` shows: recorded values, plus the values of names a run's recording
    lacks from the latest replay that logged each (a name replayed twice is exported once), and
    one value per name and (epoch, step), the last one logged there: a validation metric's epoch
    aggregate, not its per-batch values, which all share the step. Text values are left out.
    Columns: run_id, replay_id (None where recorded), name, epoch, step, value.
    """
    numeric = rec[~rec["value"].map(lambda v: isinstance(v, str))] if rec["value"].dtype == object else rec
    numeric = numeric.assign(value=numeric["value"].astype("float64"))
    recorded = numeric["replay_id"].isna()
    keys = numeric.loc[recorded, ["run_id", "name"]].drop_duplicates()
    known = numeric[["run_id", "name"]].merge(keys, how="left", indicator=True)["_merge"].eq("both").to_numpy()
    hindsight = numeric[~recorded & ~known]
    latest = hindsight.groupby(["run_id", "name"])["replay_id"].transform("last")
    keep = numeric.index.isin(hindsight.index[hindsight["replay_id"] == latest]) | recorded.to_numpy()
    chosen = numeric.loc[keep, ["run_id", "replay_id", "name", "epoch", "step", "value"]]
    chosen = chosen.drop_duplicates(["run_id", "name", "epoch", "step"], keep="last").reset_index(drop=True)
    return chosen.assign(replay_id=chosen["replay_id"].astype(object).where(chosen["replay_id"].notna(), None))


def _selected(run: str | Sequence[str] | None, db: str | Path | None) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    table = runs(db=db)
    wanted = [run] if isinstance(run, str) else list(run) if run is not None else list(table["run_id"])
    _runs.check_listed(wanted, dict(zip(table["run_id"], table["started"], strict=True)))
    if not wanted:
        return [], pd.DataFrame(columns=["run_id", "replay_id", "name", "epoch", "step", "value"])
    chosen = table[table["run_id"].isin(wanted)]
    return chosen.to_dict("records"), export_values(records(run=wanted, db=db))


def _summary(row: dict[str, Any]) -> str:
    """The run as markdown: what TensorBoard's text tab shows beside the curves."""
    lines = [f"flor run `{row['run_id']}` of `{row['script']}`, {row['status']}", ""]
    lines += [f"- shadow commit: `{row['shadow_commit']}`", "", "| hyperparameter | value |", "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in sorted(_flat(row["hparams"]).items())]
    return "\n".join(lines)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def export_tensorboard(
    logdir: str | Path, *, run: str | Sequence[str] | None = None, db: str | Path | None = None
) -> list[Exported]:
    """Write each run's values as TensorBoard event files in ``<logdir>/<run_id>``.

    Args:
        logdir: the folder to give ``tensorboard --logdir``.
        run: a run id or several (default: every run).
        db: the log store (default: the project's).

    Returns:
        One :class:`Exported` per run.

    Example:
        >>> export_tensorboard("tb")  # doctest: +SKIP
        >>> # then: tensorboard --logdir tb
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"exporting to TensorBoard needs tensorboard ({err}); pip install 'flor_lightning[tensorboard]'"
        ) from err
    chosen, values = _selected(run, db)
    out = []
    for row in chosen:
        folder = Path(logdir) / row["run_id"]
        earlier = sorted(folder.glob(f"events.out.tfevents.*{EVENT_SUFFIX}")) if folder.is_dir() else []
        mine = values[values["run_id"] == row["run_id"]]
        writer = SummaryWriter(str(folder), filename_suffix=EVENT_SUFFIX)
        try:
            writer.add_text("flor", _summary(row), 0)
            for name, step, value in zip(mine["name"], mine["step"], mine["value"], strict=True):
                writer.add_scalar(name, value, int(step))
        finally:
            writer.close()
        for path in earlier:  # replaced only once the new file is complete
            path.unlink()
        out.append(Exported(row["run_id"], "tensorboard", str(folder), len(mine), int(mine["replay_id"].notna().sum())))
    return out


def mlflow_name(name: str) -> str:
    """A flor name as MLflow accepts it (letters, digits, ``_ - . / `` and space; others become ``_``).

    Example:
        >>> mlflow_name("val_loss/dataloader_idx_0"), mlflow_name("f1@top:5")
        ('val_loss/dataloader_idx_0', 'f1_top_5')
    """
    return re.sub(r"[^a-zA-Z0-9_\-./ ]", "_", name)


def export_mlflow(
    tracking_uri: str,
    *,
    experiment: str | None = None,
    run: str | Sequence[str] | None = None,
    db: str | Path | None = None,
) -> list[Exported]:
    """Write each run into an MLflow run at ``tracking_uri`` (e.g. ``sqlite:///mlflow.db``).

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the MLflow experiment (default: each run's project); made if missing.
        run: a run id or several (default: every run).
        db: the log store (default: the project's).

    Returns:
        One :class:`Exported` per run, ``where`` being the MLflow run id.

    Example:
        >>> export_mlflow("sqlite:///mlflow.db")  # doctest: +SKIP
        >>> # then: mlflow ui --backend-store-uri sqlite:///mlflow.db
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ConfigError(f"exporting to MLflow needs mlflow ({err}); pip install 'flor_lightning[mlflow]'") from err
    chosen, values = _selected(run, db)
    client = MlflowClient(tracking_uri)
    return [_export_run(client, row, values[values["run_id"] == row["run_id"]], experiment) for row in chosen]


def _export_run(client: Any, row: dict[str, Any], values: pd.DataFrame, experiment: str | None) -> Exported:
    from mlflow.entities import Metric, Param

    ml = _find_or_create_run(client, row, experiment or row["project"])
    run_id = ml.info.run_id
    params = [
        Param(k[:250], str(v)[:_PARAM_LENGTH]) for k, v in _flat(row["hparams"]).items() if k not in ml.data.params
    ]
    for chunk in _chunks(params, _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    started = int(row["started"].timestamp() * 1000)
    new = _missing(client, run_id, values) if ml.data.metrics else values
    metrics = [
        Metric(mlflow_name(n), float(v), started, int(s))
        for n, s, v in zip(new["name"], new["step"], new["value"], strict=True)
    ]
    for chunk in _chunks(metrics, _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)
    if row["status"] in _MLFLOW_STATUS:
        ended = row["ended"]
        client.set_terminated(
            run_id, _MLFLOW_STATUS[row["status"]], int(ended.timestamp() * 1000) if pd.notna(ended) else None
        )
    return Exported(row["run_id"], "mlflow", run_id, len(new), int(new["replay_id"].notna().sum()))


def _find_or_create_run(client: Any, row: dict[str, Any], experiment: str) -> Any:
    """The MLflow run tagged with this flor run's id in ``experiment``, or a new one."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{row['run_id']}'", max_results=1)
    if existing:
        return existing[0]
    tags = {RUN_TAG: row["run_id"], "flor.project": row["project"], "flor.script": str(row["script"])}
    if row["shadow_commit"]:
        tags |= {"flor.shadow_commit": row["shadow_commit"], "mlflow.source.git.commit": row["shadow_commit"]}
    return client.create_run(
        experiment_id, start_time=int(row["started"].timestamp() * 1000), tags=tags, run_name=row["run_id"]
    )


def _missing(client: Any, run_id: str, values: pd.DataFrame) -> pd.DataFrame:
    """The values an earlier export did not write into ``run_id`` yet (compared per name, step and value)."""
    keep = []
    for name, group in values.groupby("name", sort=False):
        have = Counter(
            (m.step, repr(float(m.value))) for m in client.get_metric_history(run_id, mlflow_name(str(name)))
        )
        for index, step, value in zip(group.index, group["step"], group["value"], strict=True):
            key = (int(step), repr(float(value)))
            if have[key]:
                have[key] -= 1
            else:
                keep.append(index)
    return values.loc[sorted(keep)]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
