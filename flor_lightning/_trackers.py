"""Trackers: the logger runs a recorded fit wrote to, as plain data, and what a replay may send them.

Recording keeps, for each Lightning logger attached to the fit, what finds that logger's run
again (:func:`identity`): for TensorBoard and CSV its folder (save dir, name, version, log dir,
made absolute), for MLflow its run (tracking URI, experiment, run id); for any other logger
only its kind. Replay writes into those runs (see :mod:`flor_lightning._replay_loggers`), and
only the names the recording lacks (:func:`new_metrics`): what it re-derives is there already.

Everything here but :func:`identity` works on plain dicts, and nothing here imports Lightning
at import time, so ``flor show`` can describe the trackers without loading it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

# The kinds flor writes a replay's values back into; each is a Lightning logger class.
WRITABLE = ("tensorboard", "csv", "mlflow")
_WHY_NOT = {
    "wandb": "W&B accepts only steps above a run's last one, and the recorded steps lie before it",
}
_EXPORT_HINT = "`flor export` sends the values to TensorBoard or MLflow instead"


def kind_of(logger: object) -> dict[str, str]:
    """The logger's kind (``tensorboard``, ``csv``, ``mlflow``, ``wandb`` or ``other``) and class."""
    from lightning.pytorch import loggers

    cls = type(logger)
    kinds = (
        ("tensorboard", loggers.TensorBoardLogger),
        ("csv", loggers.CSVLogger),
        ("mlflow", loggers.MLFlowLogger),
        ("wandb", loggers.WandbLogger),
    )
    kind = next((k for k, c in kinds if isinstance(logger, c)), "other")
    return {"kind": kind, "class": f"{cls.__module__}.{cls.__qualname__}"}


def identity(logger: Any, *, cwd: str | None = None) -> dict[str, Any]:
    """What finds ``logger``'s run again, relative paths made absolute against ``cwd`` (default: now's).

    Read once the fit has started: by then Lightning has fixed the version and made the run.
    """
    from flor_lightning._lightning import logger_prefix

    cwd = cwd or os.getcwd()
    out: dict[str, Any] = kind_of(logger)
    kind = out["kind"]
    if kind in ("tensorboard", "csv"):
        out |= {
            "save_dir": absolute_path(str(logger.save_dir), cwd),
            "name": logger.name,
            "version": logger.version,
            "log_dir": absolute_path(str(logger.log_dir), cwd),
            "prefix": logger_prefix(logger),
        }
        if kind == "tensorboard" and logger.sub_dir is not None:
            out["sub_dir"] = str(logger.sub_dir)
    elif kind == "mlflow":
        client = logger.experiment
        out |= {
            "tracking_uri": absolute_uri(str(client.tracking_uri), cwd),
            "experiment_id": logger.experiment_id,
            "experiment_name": client.get_experiment(logger.experiment_id).name,
            "run_id": logger.run_id,
            "prefix": logger_prefix(logger),
        }
    return out


def identities(loggers: Iterable[Any], *, cwd: str | None = None) -> list[dict[str, Any]]:
    """:func:`identity` of each logger; one that cannot be read is kept as its kind, with the reason."""
    out = []
    for logger in loggers:
        try:
            out.append(identity(logger, cwd=cwd))
        except Exception as err:  # a tracker's trouble must not cost the user the recording
            out.append(kind_of(logger) | {"unreadable": f"{type(err).__name__}: {err}"})
    return out


def absolute_path(path: str, cwd: str) -> str:
    """``path`` made absolute against ``cwd``; a URL (``s3://...``) stays as it is.

    Example:
        >>> absolute_path("lightning_logs", "/work/proj")
        '/work/proj/lightning_logs'
    """
    if "://" in path:
        return path
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def absolute_uri(uri: str, cwd: str) -> str:
    """An MLflow tracking URI with a relative local path (``file:./mlruns``, ``sqlite:///m.db``,
    ``./mlruns``) made absolute against ``cwd``; server URIs stay as they are.

    Example:
        >>> absolute_uri("sqlite:///mlflow.db", "/work/proj")
        'sqlite:////work/proj/mlflow.db'
    """
    for scheme in ("sqlite:///", "file:"):
        rest = uri.removeprefix(scheme)
        if rest != uri:
            relative = not rest.startswith("/") and rest != ":memory:"
            return scheme + absolute_path(rest, cwd) if relative else uri
    if "://" in uri or uri == "databricks":
        return uri
    return absolute_path(uri, cwd)


def is_recorded(name: str, recorded: Collection[str]) -> bool:
    """Whether a logger already holds ``name`` from the recording (the replay then re-derives it).

    ``recorded`` holds the names flor recorded. Lightning's loggers name a value logged both per
    step and per epoch ``name_step`` and ``name_epoch`` (flor: ``name`` and ``name_epoch``), and
    add ``epoch`` to every call.

    Example:
        >>> [is_recorded(n, {"train_loss", "val_loss"}) for n in ("train_loss_step", "epoch", "val_f1")]
        [True, True, False]
    """
    if name in recorded or name == "epoch":
        return True
    base = name.removesuffix("_step")
    return base != name and base in recorded


def new_metrics(
    metrics: Mapping[str, Any], recorded: Collection[str], *, logged: Collection[str] | None = None
) -> dict[str, Any]:
    """The part of one logger call that the recorded run's logger does not hold yet.

    With ``logged`` (the names ``self.log`` sent to the loggers so far: ``trainer.logged_metrics``),
    only those pass: a callback that logs to the loggers directly (``LearningRateMonitor``) bypasses
    flor's record, so its names look new, though a re-trained replay only repeats them.
    """
    return {k: v for k, v in metrics.items() if not is_recorded(k, recorded) and (logged is None or k in logged)}


def plan(
    recorded: Sequence[dict[str, Any]] | None,
    current: Sequence[dict[str, str]],
    *,
    run_id: str,
    world_size: int = 1,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Which recorded logger runs a replay writes into, and the one-line notes to print.

    Args:
        recorded: the run's logger identities (None: recorded before flor kept them).
        current: :func:`kind_of` the replaying Trainer's own loggers (replaced during the replay).
        run_id: the replayed run.
        world_size: processes of the replay.

    Example:
        >>> targets, notes = plan([{"kind": "wandb", "class": "x.WandbLogger"}], [], run_id="r")
        >>> targets, notes[0].split(":")[1]
        ([], ' WandbLogger is not written to during this replay')
    """
    targets = [i for i in recorded or [] if i["kind"] in WRITABLE and "unreadable" not in i]
    notes = []
    if recorded is None:
        notes.append(
            f"flor: run {run_id} was recorded before flor kept its loggers' runs, so no logger receives this "
            f"replay's values; {_EXPORT_HINT}"
        )
    others = {i["class"]: i["kind"] for i in [*(recorded or []), *current] if i["kind"] not in WRITABLE}
    for cls, kind in others.items():
        why = _WHY_NOT.get(kind, "flor writes back only into TensorBoardLogger, CSVLogger and MLFlowLogger runs")
        notes.append(f"flor: {cls.rsplit('.', 1)[-1]} is not written to during this replay: {why}; {_EXPORT_HINT}")
    notes += [
        f"flor: the recorded {i['kind']} logger could not be read when the run was recorded ({i['unreadable']}); "
        f"nothing is written to it; {_EXPORT_HINT}"
        for i in recorded or []
        if "unreadable" in i
    ]
    if targets and world_size > 1:
        notes.append(
            "flor: Lightning's loggers write from rank 0 only, so only rank 0's segment reaches them; "
            f"{_EXPORT_HINT} for every segment"
        )
    return targets, notes


def describe(ident: Mapping[str, Any]) -> str:
    """One line naming a recorded logger's run, for ``flor show`` and the replay's announcement.

    Example:
        >>> describe({"kind": "tensorboard", "class": "L.TensorBoardLogger", "log_dir": "/p/lightning_logs/version_0"})
        'tensorboard /p/lightning_logs/version_0'
    """
    kind = ident["kind"]
    if "unreadable" in ident:
        return f"{kind} ({ident['class'].rsplit('.', 1)[-1]}): could not be read: {ident['unreadable']}"
    if kind in ("tensorboard", "csv"):
        return f"{kind} {ident['log_dir']}"
    if kind == "mlflow":
        return (
            f"mlflow {ident['tracking_uri']} experiment {ident['experiment_name']!r} ({ident['experiment_id']}) "
            f"run {ident['run_id']}"
        )
    return f"{kind} ({ident['class'].rsplit('.', 1)[-1]}): kind only, flor cannot write back to it"


def show_lines(loggers: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The ``loggers`` section of ``flor show``."""
    if loggers is None:
        return ["loggers: not recorded (the run is older than flor's record of loggers)"]
    return [f"loggers: {len(loggers) or 'none'}", *(f"  {describe(i)}" for i in loggers)]
