"""A replay's loggers: Lightning loggers pointed back at the runs the recording's loggers wrote.

For the replay's duration (:func:`point_at_recording`) the Trainer's own loggers are set aside
and replaced by one :class:`HindsightLogger` per recorded run flor can write back to:

- TensorBoard: a ``TensorBoardLogger`` with the recorded save dir, name and version, so a new
  event file lands in the recorded run's folder and TensorBoard shows the new curves in that run.
- MLflow: an ``MLFlowLogger`` on the recorded run id, which is tagged ``flor.replay_id``.
- CSV: :class:`CSVBesideLogger`, a ``metrics.flor-<replay_id>.csv`` beside the recorded
  ``metrics.csv`` (Lightning's CSVLogger deletes the ``metrics.csv`` of a folder it opens).

Each passes on only the names the recording lacks, on the steps Lightning gives it, which are
the recorded ones. The Trainer's loggers get nothing during the replay, so no new
``lightning_logs/version_N`` appears.
"""

from __future__ import annotations

import csv
import json
import os
from argparse import Namespace
from collections.abc import Callable, Collection, Mapping
from contextlib import closing
from typing import TYPE_CHECKING, Any

import fsspec
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from flor_lightning import _store as store
from flor_lightning import _trackers as trackers

if TYPE_CHECKING:
    import lightning.pytorch as pl

REPLAY_TAG = "flor.replay_id"
_CSV_FLUSH_ROWS = 100  # as Lightning's CSVLogger (flush_logs_every_n_steps)


class HindsightLogger(Logger):
    """A recorded run's logger during a replay: it passes on only the names the recording lacks.

    Hyperparameters and the model graph are not logged again (the recording did). ``save`` and
    ``finalize`` reach the wrapped logger only once something was written, so a replay with no
    new name leaves the recorded run's folder as it was.

    Args:
        inner: the Lightning logger pointed at the recorded run.
        recorded: the names flor recorded for the run.
        finish: whether ``finalize`` reaches ``inner`` (not for MLflow: it would mark the recorded
            run terminated anew, with a new end time).
        logged: the names ``self.log`` has sent to the loggers so far (``trainer.logged_metrics``);
            only those pass (see :func:`trackers.new_metrics`).
    """

    def __init__(
        self,
        inner: Logger,
        recorded: Collection[str],
        *,
        finish: bool = True,
        logged: Callable[[], Collection[str]] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.recorded = frozenset(recorded)
        self.finish = finish
        self.logged = logged
        self.written = 0

    @property
    @override
    def name(self) -> str | None:
        return self.inner.name

    @property
    @override
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    @override
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    @override
    def log_dir(self) -> str | None:
        return self.inner.log_dir

    @property
    def experiment(self) -> Any:
        """The wrapped logger's experiment (``self.logger.experiment.add_image(...)`` lands in the recorded run)."""
        return getattr(self.inner, "experiment", None)

    @override
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass  # the recording logged them

    @override
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        pass

    @override
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        new = trackers.new_metrics(metrics, self.recorded, logged=self.logged() if self.logged else None)
        if new:
            self.inner.log_metrics(new, step)
            self.written += len(new)

    @override
    def save(self) -> None:
        if self.written:
            self.inner.save()

    @override
    def finalize(self, status: str) -> None:
        if self.written and self.finish:
            self.inner.finalize(status)


class CSVBesideLogger(Logger):
    """Writes ``metrics.flor-<replay_id>.csv`` in a recorded CSVLogger run's folder, in CSVLogger's
    columns (the names, sorted, ``step`` among them); the recorded ``metrics.csv`` is never opened."""

    def __init__(self, log_dir: str, *, replay_id: str, prefix: str = "") -> None:
        super().__init__()
        self.path = f"{log_dir.rstrip('/')}/metrics.flor-{replay_id}.csv"
        self._log_dir = log_dir
        self._version = replay_id
        self._prefix = prefix
        self._pending: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = []

    @property
    @override
    def name(self) -> str:
        return os.path.basename(os.path.dirname(self._log_dir.rstrip("/")))

    @property
    @override
    def version(self) -> str:
        return self._version

    @property
    @override
    def save_dir(self) -> str:
        return self._log_dir

    @property
    @override
    def log_dir(self) -> str:
        return self._log_dir

    @override
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        join = f"{self._prefix}-" if self._prefix else ""
        self._pending.append({**{f"{join}{k}": v for k, v in metrics.items()}, "step": step})
        if len(self._pending) >= _CSV_FLUSH_ROWS:
            self._write()

    @override
    def save(self) -> None:
        pass  # Lightning calls this after every logging call: rows are written in batches

    @override
    def finalize(self, status: str) -> None:
        self._write()

    def _write(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._rows += pending
        columns = sorted(set(self._columns).union(*pending))
        fs, path = fsspec.core.url_to_fs(self.path)
        rewrite = columns != self._columns  # a new name: the header changes, so the file is written anew
        with fs.open(path, "w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if rewrite:
                writer.writeheader()
            writer.writerows(self._rows if rewrite else pending)
        self._columns = columns


def open_logger(
    ident: dict[str, Any],
    *,
    replay_id: str,
    recorded: Collection[str],
    logged: Callable[[], Collection[str]] | None = None,
) -> tuple[HindsightLogger | None, str]:
    """The logger writing into the recorded run ``ident`` (a :func:`trackers.identity`), and a line
    saying where the values go, or None and a note saying why nothing is written there."""
    kind = ident["kind"]
    where = trackers.describe(ident)
    if kind in ("tensorboard", "csv"):
        fs, path = fsspec.core.url_to_fs(ident["log_dir"])
        if not fs.isdir(path):
            return None, f"flor: the recorded {kind} run folder {ident['log_dir']} is gone; nothing is written there"
    try:
        inner: Logger
        if kind == "tensorboard":
            inner = TensorBoardLogger(
                ident["save_dir"],
                name=ident["name"],
                version=ident["version"],
                sub_dir=ident.get("sub_dir"),
                prefix=ident["prefix"],
                default_hp_metric=False,
            )
        elif kind == "csv":
            inner = CSVBesideLogger(ident["log_dir"], replay_id=replay_id, prefix=ident["prefix"])
            where = f"csv {inner.path}"
        else:
            mlflow = MLFlowLogger(tracking_uri=ident["tracking_uri"], run_id=ident["run_id"], prefix=ident["prefix"])
            mlflow.experiment.set_tag(ident["run_id"], REPLAY_TAG, replay_id)  # finds the recorded run, or raises
            inner = mlflow
    except Exception as err:  # a tracker out of reach (a server down, mlflow not installed) must not stop the replay
        return (
            None,
            f"flor: the recorded {where} cannot be written ({type(err).__name__}: {err}); nothing is written there",
        )
    return HindsightLogger(inner, recorded, finish=kind != "mlflow", logged=logged), f"flor: new values go to {where}"


def recorded_trackers(db_path: str, run_id: str) -> tuple[list[dict[str, Any]] | None, set[str]]:
    """The run's recorded logger identities (None: recorded before flor kept them) and recorded names."""
    with closing(store.connect(db_path)) as conn:
        rows = store.fetch(conn, "SELECT loggers FROM runs WHERE run_id = ?", [run_id])
        names = store.fetch(conn, "SELECT DISTINCT name FROM logs WHERE run_id = ? AND replay_id IS NULL", [run_id])
    loggers = rows[0]["loggers"] if rows else None
    return (json.loads(loggers) if loggers is not None else None), {r["name"] for r in names}


def point_at_recording(
    trainer: pl.Trainer, *, db_path: str, run_id: str, replay_id: str, enabled: bool = True
) -> list[Logger]:
    """Replace ``trainer.loggers`` for a replay; return the Trainer's own loggers, to put back after it.

    With ``enabled`` the replay's loggers write into the recorded run's TensorBoard, CSV and MLflow
    runs (see the module's docstring); without, no logger receives anything. Where none is written
    to, a Trainer that had loggers keeps Lightning's ``DummyLogger``, which drops everything, so
    callbacks that refuse a Trainer without a logger (``LearningRateMonitor``) still run.
    """
    own = list(trainer.loggers)
    trainer.loggers = [DummyLogger()] if own else []
    if not enabled:
        return own
    recorded, names = recorded_trackers(db_path, run_id)
    targets, notes = trackers.plan(
        recorded, [trackers.kind_of(lg) for lg in own], run_id=run_id, world_size=trainer.world_size
    )
    opened: list[Logger] = []
    for ident in targets:
        logger, line = open_logger(ident, replay_id=replay_id, recorded=names, logged=lambda: trainer.logged_metrics)
        if logger is None:
            notes.append(line)
        else:
            opened.append(logger)
            rank_zero_info(line)
    for note in notes:
        rank_zero_warn(note)
    if opened:
        trainer.loggers = opened
    return own
