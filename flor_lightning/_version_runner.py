"""Run a recorded script with its ``Trainer.fit`` turned into a replay of one run.

Started by :func:`flor_lightning.replay_runs` in a checkout of the run's code version::

    python -m flor_lightning._version_runner --run ID [--segments N] [--train auto|true|false]
        [--probe /abs/file.py:Class] [--report out.json] [--parent PID] -- script.py [recorded arguments...]

The script runs as ``python script.py ...`` would (``__main__``, ``sys.argv``, its folder first
on ``sys.path``). Only in this process, ``lightning.pytorch.Trainer.fit`` is replaced: its
first call replays run ``ID`` (``flor.Trainer`` or a plain Trainer with a ``FlorCallback``,
LightningCLI scripts included), with the probe callback added; later ``fit`` calls and
``validate``/``test``/``predict`` are skipped, since they would record again. The replay
report is written as JSON to ``--report``. With ``--parent``, the process is killed when that
process (the executor's worker that started it) dies, on Linux: a retry of the task on another
worker replays under the same replay id, and nothing may write beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import runpy
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from flor_lightning._codecheck import TRAINING_HOOKS
from flor_lightning._multiversion import load_probe
from flor_lightning._replay import run_replay


@dataclass
class _Plan:
    run: str
    segments: int
    train: bool | None
    probe: type[pl.Callback] | None
    report: Path | None
    replaying: bool = False
    done: bool = False


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The runner's options and the script's command line (after ``--``)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m flor_lightning._version_runner")
    parser.add_argument("--run", required=True)
    parser.add_argument("--segments", type=int, default=1)
    parser.add_argument("--train", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--probe")
    parser.add_argument("--report", type=Path)
    parser.add_argument("--parent", type=int)
    args = parser.parse_args(argv[:cut])
    script = argv[cut + 1 :]
    if not script:
        parser.error("give the script and its arguments after --")
    return args, script


def probe_trains(probe: type[pl.Callback]) -> bool:
    """Whether the probe's own hooks sit on the training path (so restored epochs would not call them)."""
    own = [k for k in probe.__mro__ if issubclass(k, pl.Callback) and k is not pl.Callback]
    return any(name in vars(k) for k in own for name in TRAINING_HOOKS)


def _replaying_fit(plan: _Plan, original: Callable[..., Any]) -> Callable[..., Any]:
    def fit(
        self: pl.Trainer,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Any = None,
        ckpt_path: Any = None,
        **kwargs: Any,
    ) -> None:
        if plan.replaying:  # the replay's own fits
            return original(self, model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)  # type: ignore[no-any-return]
        if plan.done:
            print(f"flor: skipped a further Trainer.fit during the replay of run {plan.run}", flush=True)
            return None
        if isinstance(train_dataloaders, pl.LightningDataModule):  # fit(model, dm)
            datamodule, train_dataloaders = train_dataloaders, None
        probe = plan.probe() if plan.probe is not None else None
        callbacks = self.callbacks  # type: ignore[attr-defined]
        if probe is not None:
            callbacks.append(probe)
        train = plan.train
        if train is None and plan.probe is not None and probe_trains(plan.probe):
            train = True
            print(f"flor: the probe {plan.probe.__qualname__} hooks the training path; re-training", flush=True)
        plan.replaying = True
        try:
            report = run_replay(
                self,
                model,
                datamodule=datamodule,
                train_dataloaders=train_dataloaders,
                val_dataloaders=val_dataloaders,
                run=plan.run,
                epochs=None,
                segments=plan.segments,
                segment=None,
                train=train,
            )
        finally:
            plan.replaying = False
            if probe is not None and probe in callbacks:
                callbacks.remove(probe)
        plan.done = True
        if plan.report is not None:
            plan.report.write_text(json.dumps(asdict(report)))
        return None

    return fit


def _skipped(name: str, plan: _Plan) -> Callable[..., Any]:
    def skip(self: pl.Trainer, *args: Any, **kwargs: Any) -> list[Any]:
        print(f"flor: skipped Trainer.{name} during the replay of run {plan.run}", flush=True)
        return []

    return skip


def die_with(parent: int) -> None:
    """Have Linux kill this process when ``parent`` dies (``PR_SET_PDEATHSIG``); exit now if it already did."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(f"flor: error: the process {parent} that started this replay is gone; not replaying")


def main(argv: Sequence[str] | None = None) -> int:
    """Replay run ``--run`` by running the script; 0 when it replayed, 3 when the script never called fit."""
    args, script = parse(sys.argv[1:] if argv is None else argv)
    if args.parent is not None:
        die_with(args.parent)
    path = Path(script[0]).resolve()
    sys.argv = [str(path), *script[1:]]
    sys.path[0] = str(path.parent)  # as `python script.py` has it; the probe's imports resolve there too
    probe = None
    if args.probe:
        file, _, qualname = args.probe.rpartition(":")
        probe = load_probe(Path(file), qualname)
    train = {"auto": None, "true": True, "false": False}[args.train]
    plan = _Plan(args.run, args.segments, train, probe, args.report)
    pl.Trainer.fit = _replaying_fit(plan, pl.Trainer.fit)  # type: ignore[method-assign]
    for name in ("validate", "test", "predict"):
        setattr(pl.Trainer, name, _skipped(name, plan))
    runpy.run_path(str(path), run_name="__main__")
    if not plan.done:
        print(f"flor: error: {path.name} finished without calling Trainer.fit, so run {args.run} was not replayed")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
