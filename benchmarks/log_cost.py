"""W3: what FlorCallback adds to each ``self.log`` call, beside the loggers users pick instead
(CSVLogger, mlflow.log_metric, flordb.log). How it measures: benchmarks/README.md.

Run alone: ``python benchmarks/log_cost.py [--smoke]``; record_overhead.py runs it as a section.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness
import lightning.pytorch as pl
import torch
from _harness import clock, median, spread, table, target
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor

TARGET_US = 5.0
VARIANTS = ("plain", "flor", "csv", "mlflow", "flordb")
PEERS = {"csv": "lightning", "mlflow": "mlflow", "flordb": "flordb"}  # variant: the package it needs
TIMED = {  # variant: what is timed per value
    "csv": "Lightning's logging path per step (tensors to floats, CSVLogger.log_metrics, save) + finalize",
    "mlflow": "each mlflow.log_metric(name, value.item(), step=...) call + end_run",
    "flordb": "each flordb.log(name, value.item()) call (its print to /dev/null) + flordb.commit()",
}
PEER_NAMES = {"csv": "CSVLogger (log_every_n_steps=1)", "mlflow": "mlflow.log_metric → sqlite", "flordb": "flordb.log"}


@dataclass(frozen=True)
class LogConfig:
    steps: int = 200
    values: int = 50
    repeats: int = 3
    batch: int = 8
    slow_steps: int = 10  # for mlflow, whose log_metric to sqlite takes milliseconds per value


SMOKE = LogConfig(steps=40, values=50, repeats=1, slow_steps=2)


# ---- shared with record_overhead.py: the Lightning side of a benchmark fit ----------------------


class EpochTimer(Callback):
    """Timestamps of the training loop: train start/end and each epoch's start.

    Attach it first: callbacks run in list order (Lightning only moves ModelCheckpoint last),
    so an epoch's start timestamp is taken before any other callback's epoch-start work.
    """

    def __init__(self) -> None:
        self.train_start = self.train_end = float("nan")
        self.starts: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_start = clock()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(clock())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = clock()

    def periods(self) -> list[float]:
        """Seconds from each epoch's start to the next one's (the last: to the end of training)."""
        return [b - a for a, b in itertools.pairwise([*self.starts, self.train_end])]


def quiet_lightning() -> None:
    """Silence Lightning's info lines and the warnings a tiny synthetic workload triggers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    for message in ("does not have many workers", "smaller than the logging interval", "GPU available but not used"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13, not ours


# ---- the workload ---------------------------------------------------------------------------


class ManyScalars(pl.LightningModule):
    """A linear model whose training step logs ``n`` scalar tensors, timing each call.

    ``sink`` picks the logging call: ``"self.log"`` (plain, flor, csv), ``"mlflow"``
    (``mlflow.log_metric(name, value.item(), step=...)``) or ``"flordb"`` (``flordb.log(name, value.item())``).
    """

    def __init__(self, n: int, sink: str = "self.log") -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)
        self.names = [f"metric_{i:02d}" for i in range(n)]
        self.register_buffer("scales", torch.arange(1, n + 1, dtype=torch.float32))
        # [outer, inner] seconds: whole self.log calls as the training step sees them, and Lightning's
        # own LightningModule.log. A list, mutated in place: nn.Module.__setattr__ would cost µs per call.
        self.seconds = [0.0, 0.0]
        self.log_calls = 0
        self.sink = sink

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        start = clock()
        super().log(name, value, *args, **kwargs)
        self.seconds[1] += clock() - start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        emit = self._emitter()
        for name, value in zip(self.names, (loss.detach() * self.scales).unbind(), strict=True):
            start = clock()
            emit(name, value)
            self.seconds[0] += clock() - start
        self.log_calls += len(self.names)
        return loss

    def _emitter(self) -> Any:
        """The one call each value goes through, as a user of that tool would write it."""
        if self.sink == "mlflow":
            import mlflow

            step = self.global_step
            return lambda name, value: mlflow.log_metric(name, value.item(), step=step)
        if self.sink == "flordb":
            import flordb

            return lambda name, value: flordb.log(name, value.item())
        return self.log

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TimedCSVLogger(CSVLogger):
    """CSVLogger whose finalize (the last flush of metrics.csv) is timed."""

    finalize_seconds = 0.0

    def finalize(self, status: str) -> None:
        start = clock()
        super().finalize(status)
        self.finalize_seconds += clock() - start


def _time_logger_connector(seconds: list[float]) -> None:
    """Time Lightning's per-step logging path (tensors to floats, each logger's log_metrics and save).

    This child is thrown away after the fit, so patching the class is contained.
    """
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    log_metrics = _LoggerConnector.log_metrics

    def timed(self: Any, metrics: Any, step: int | None = None) -> None:
        start = clock()
        log_metrics(self, metrics, step)
        seconds[0] += clock() - start

    _LoggerConnector.log_metrics = timed  # type: ignore[method-assign]


def _peer_setup(variant: str, workdir: str) -> tuple[Any, Path | None]:
    """Open the peer's run before the fit (not timed); return what closes it (timed, as its flush)
    and a folder to remove afterwards."""
    if variant == "mlflow":
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.ERROR)
        mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
        mlflow.set_experiment("w3")
        mlflow.start_run()
        return mlflow.end_run, None
    if variant == "flordb":
        # FlorDB needs a git repository (it switches it to a branch of its own) and reads sys.argv
        # when imported: give it a repository of its own and a script name.
        repo = _harness.git_sandbox({"w3.py": "# W3 logging loop\n"})
        os.chdir(repo)
        sys.argv = ["w3.py"]
        # flordb.log prints every value; a terminal would cost more than /dev/null (a lower bound).
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        import flordb

        return flordb.commit, repo
    return None, None


def fit_once(variant: str, cfg: LogConfig, sandbox: str, workdir: str) -> dict[str, Any]:
    """One fit in a forked child: ``variant`` is one of :data:`VARIANTS`."""
    os.chdir(sandbox)
    quiet_lightning()
    pl.seed_everything(0, verbose=False)
    steps = cfg.slow_steps if variant == "mlflow" else cfg.steps
    g = torch.Generator().manual_seed(0)
    n = steps * cfg.batch
    data = DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 1, generator=g)), cfg.batch)
    model = ManyScalars(cfg.values, sink=variant if variant in ("mlflow", "flordb") else "self.log")
    timer = EpochTimer()
    recorder = flor.FlorCallback(checkpoint_dir=f"{workdir}/flor") if variant == "flor" else None
    csv, logger_seconds = (TimedCSVLogger(f"{workdir}/csv") if variant == "csv" else None), [0.0]
    if csv is not None:
        _time_logger_connector(logger_seconds)
    close, scratch = _peer_setup(variant, workdir)
    callbacks = [timer, recorder] if recorder else [timer]
    trainer = pl.Trainer(max_epochs=1, max_steps=steps, accelerator="cpu", devices=1, logger=csv or False,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    start = clock()
    trainer.fit(model, data)
    fit_seconds, start = clock() - start, clock()
    if close is not None:
        close()
    flush = clock() - start + (csv.finalize_seconds if csv is not None else 0.0)
    if scratch is not None:
        _harness.remove(scratch)
    return {
        "variant": variant,
        "loop_seconds": timer.train_end - timer.train_start,
        "fit_seconds": fit_seconds,
        "outer_seconds": model.seconds[0],
        "inner_seconds": model.seconds[1],
        "log_calls": model.log_calls,
        "logger_seconds": logger_seconds[0],
        "flush_seconds": flush,
        "writer_cpu": recorder.stats.log_writer_cpu_seconds if recorder else None,
        "rows_stored": len(flor.records(run=recorder.run_id)) if recorder else None,
    }


def run(cfg: LogConfig, *, quiet_wait: float = 20.0, variants: tuple[str, ...] = VARIANTS) -> list[dict[str, Any]]:
    """Interleave ``variants`` ``cfg.repeats`` times; return every fit's result (a peer that cannot
    run here is a row ``{"variant": name, "skipped": reason}``)."""
    sandbox = _harness.git_sandbox({"train.py": Path(__file__).read_text()})
    workdir = sandbox.parent / f"{sandbox.name}-peers"  # kept across fits: mlflow's store is created once
    workdir.mkdir()

    def fit(variant: str) -> dict[str, Any]:
        if quiet_wait > 0:
            _harness.wait_until_quiet(max_wait=quiet_wait)  # the machine may be shared: start in a lull
        try:
            return _harness.run_forked(fit_once, variant, cfg, str(sandbox), str(workdir))
        finally:
            _harness.remove(workdir / "flor")
            _harness.remove(workdir / "csv")

    try:
        return _harness.interleave(variants, cfg.repeats, fit, lambda r: f"loop {r['loop_seconds']:.2f} s", PEERS)
    finally:
        _harness.remove(sandbox)
        _harness.remove(workdir)


# ---- report ---------------------------------------------------------------------------------


def _us(seconds: float, calls: int) -> float:
    return seconds / calls * 1e6


def per_value(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """µs each variant adds per logged value, per repeat (see the module docstring); plain is the floor.

    ``flor`` is flor's training thread, ``writer`` its log writer's CPU per value, ``flor_total`` both.
    """
    by = {v: [r for r in results if r["variant"] == v and "skipped" not in r] for v in VARIANTS}
    floor = median([_us(r["outer_seconds"] - r["inner_seconds"], r["log_calls"]) for r in by["plain"]])
    out = {
        "flor": [_us(r["outer_seconds"] - r["inner_seconds"], r["log_calls"]) - floor for r in by["flor"]],
        "writer": [_us(r["writer_cpu"], max(r["rows_stored"], 1)) for r in by["flor"]],
        "csv": [_us(r["logger_seconds"] + r["flush_seconds"], r["log_calls"]) for r in by["csv"]],
    }
    out["flor_total"] = [a + b for a, b in zip(out["flor"], out["writer"], strict=True)]
    for v in ("mlflow", "flordb"):
        out[v] = [_us(r["outer_seconds"] + r["flush_seconds"], r["log_calls"]) - floor for r in by[v]]
    return out


def _ratio(cost: dict[str, list[float]], variant: str) -> str:
    """``variant``'s cost per value over flor's (both threads), repeat by repeat."""
    return spread([x / b for x, b in zip(cost[variant], cost["flor_total"], strict=False) if b > 0], "{:.1f}") + "x"


def _skipped(results: list[dict[str, Any]], variant: str) -> str | None:
    return next((r["skipped"] for r in results if r["variant"] == variant and "skipped" in r), None)


def report(cfg: LogConfig, results: list[dict[str, Any]]) -> list[str]:
    """The markdown of the section: flor's added cost per call, and the peers beside flor."""
    ran = [r for r in results if "skipped" not in r]
    plain, flor_ = [r for r in ran if r["variant"] == "plain"], [r for r in ran if r["variant"] == "flor"]
    calls, cost = {r["variant"]: r["log_calls"] for r in ran}, per_value(results)
    wall = [_us(f["loop_seconds"] - p["loop_seconds"], calls["plain"]) for p, f in zip(plain, flor_, strict=True)]
    plain_us = [_us(r["loop_seconds"], calls["plain"]) for r in plain]
    noise = f"{max(plain_us) - min(plain_us):.2f} µs/call" if len(plain) > 1 else "n/a, 1 repeat"
    fits = []
    for v, rs in (("plain", plain), ("flor", flor_)):
        own, stored = [_us(r["inner_seconds"], calls[v]) for r in rs], [str(r["rows_stored"]) for r in rs]
        fits.append([v, spread([r["loop_seconds"] for r in rs]), spread(own, "{:.1f}"),
                     spread([r["fit_seconds"] for r in rs]), ", ".join(stored) if v == "flor" else "-"])  # fmt: skip
    n = calls.get("flor", "-")
    rows = [
        ["flor", "training thread, inside the call (flor's `log` wrapper)", n, spread(cost["flor"], "{:.2f}"), "-"],
        ["flor", "log-writer thread CPU per value stored (background)", n, spread(cost["writer"], "{:.2f}"), "-"],
        ["flor", "total CPU per value, both threads", n, spread(cost["flor_total"], "{:.2f}"), "1"],
        ["flor", f"cross-check: A/B train-loop wall, paired by repeat (plain's spread {noise})", n,
         spread(wall, "{:.2f}"), "-"],
    ]  # fmt: skip
    for v, what in TIMED.items():
        if (skipped := _skipped(results, v)) or not cost[v]:
            rows.append([v, f"SKIPPED: {skipped or 'not run'}", "-", "-", "-"])
        else:
            rows.append([v, what, calls[v], spread(cost[v], "{:.1f}"), _ratio(cost, v)])
    lines = [
        f"### Cost per `self.log` call: {cfg.values} scalars/step x {cfg.steps} steps (mlflow: {cfg.slow_steps}), "
        f"{cfg.repeats} interleaved repeats; flor vs the loggers users pick instead",
        "",
        *table("variant | train loop s | Lightning's own self.log, µs/call | whole fit s | values flor stored", fits),
        "",
        *table(
            "variant | what is timed | values per fit | µs per value, median [min-max] | ratio to flor's total", rows
        ),
        "",
        "- Lightning's own `self.log` (hundreds of µs here) is paid by every variant that uses it and is not counted; "
        "mlflow and flordb replace `self.log` by their own call in the same training step.",
    ]
    if any(r["rows_stored"] != r["log_calls"] for r in flor_):
        lines.append("- **WARNING**: flor stored a different number of values than self.log calls made")
    return lines


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md."""
    cost = per_value(results)
    flor_call, flor_total = spread(cost["flor"], "{:.2f}"), spread(cost["flor_total"], "{:.2f}")
    rows = [
        target("w3_self_log", "W3 flor's added cost per `self.log` value, training thread (µs)", flor_call,
               f"≤ {TARGET_US:.0f} µs", median(cost["flor"]) <= TARGET_US),
        target("w3_both_threads", "W3 the same, counting flor's background log writer's CPU too (µs)", flor_total,
               f"(≤ {TARGET_US:.0f} µs)"),
    ]  # fmt: skip
    for v, name in PEER_NAMES.items():
        measured = f"SKIPPED: {skipped}" if (skipped := _skipped(results, v)) else _ratio(cost, v) if cost[v] else "-"
        rows.append(target(f"w3_vs_{v}", f"W3 {name} cost per value ÷ flor's (both threads)", measured,
                           "- (> 1: flor cheaper)"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (< 30 s)")
    parser.add_argument("--steps", type=int, help="training steps per fit")
    parser.add_argument("--repeats", type=int, help="fits per variant")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else LogConfig()
    cfg = LogConfig(args.steps or cfg.steps, cfg.values, args.repeats or cfg.repeats, cfg.batch, cfg.slow_steps)
    print("\n".join(report(cfg, run(cfg, quiet_wait=0.0 if args.smoke else 20.0))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
