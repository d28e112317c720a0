"""What FlorCallback adds to each ``self.log`` call: a tiny model logging many scalars per step.

Plain Lightning and FlorCallback fits alternate (plain, flor, plain, flor, ...), each in a
fresh forked child with a fresh Trainer. Lightning's own ``self.log`` costs hundreds of µs per
call on a small CPU, so an A/B wall-clock difference cannot resolve a few µs; the added cost
is therefore measured two ways:

* CPU accounting (precise, judged): the module's ``log`` is overridden to time Lightning's
  own work ("inner"); the training step times each whole ``self.log`` call ("outer"). flor's
  wrapper sits between the two, so ``outer - inner`` is the time it adds on the training
  thread (the plain fits give the timer's own floor, subtracted). Added to it: the CPU time of
  flor's log-writer thread per value stored: each background flush (encode, insert, commit) is
  timed on the thread's CPU clock, the final one at teardown included; opening the store once
  per fit (~4 ms) is not counted.
* A/B wall clock (cross-check): (flor train loop - plain train loop) / calls, paired by repeat.

Run alone: ``python benchmarks/log_cost.py [--smoke]``; record_overhead.py runs it as a section.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _harness import (
    EpochTimer,
    clock,
    git_sandbox,
    median,
    quiet_lightning,
    remove,
    run_forked,
    spread,
    verdict,
    wait_until_quiet,
)
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor
import flor_lightning.store as flor_store

TARGET_US = 5.0


@dataclass(frozen=True)
class LogConfig:
    steps: int = 200
    values: int = 50
    repeats: int = 3
    batch: int = 8
    slow_steps: int = 10  # for mlflow, whose log_metric to sqlite takes milliseconds per value


SMOKE = LogConfig(steps=40, values=50, repeats=1, slow_steps=2)


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
        emit = _emitter(self)
        for name, value in zip(self.names, (loss.detach() * self.scales).unbind(), strict=True):
            start = clock()
            emit(name, value)
            self.seconds[0] += clock() - start
        self.log_calls += len(self.names)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _emitter(module: ManyScalars) -> Any:
    """The one call each value goes through, as a user of that tool would write it."""
    if module.sink == "mlflow":
        import mlflow

        step = module.global_step
        return lambda name, value: mlflow.log_metric(name, value.item(), step=step)
    if module.sink == "flordb":
        import flordb

        return lambda name, value: flordb.log(name, value.item())
    return module.log


def _time_log_writes(cpu: list[float]) -> None:
    """Add the CPU time of each background flush of flor's log writer (encode + sqlite insert +
    commit, the final flush included) to ``cpu[0]``; this fit runs in a throwaway child."""
    write = flor_store.LogWriter._write

    def timed(self: flor_store.LogWriter, conn: sqlite3.Connection) -> None:
        start = time.thread_time()
        try:
            write(self, conn)
        finally:
            cpu[0] += time.thread_time() - start

    flor_store.LogWriter._write = timed  # type: ignore[method-assign]


def _rows(recorder: flor.FlorCallback) -> int:
    if recorder.location is None:
        return 0
    with sqlite3.connect(recorder.location.db_path) as conn:
        return int(conn.execute("SELECT count(*) FROM logs WHERE run_id = ?", (recorder.run_id,)).fetchone()[0])


VARIANTS = ("plain", "flor", "csv", "mlflow", "flordb")
PEERS = {  # variant: (module it needs, what it is)
    "csv": ("lightning", "Lightning CSVLogger, log_every_n_steps=1"),
    "mlflow": ("mlflow", "mlflow.log_metric to a sqlite tracking store"),
    "flordb": ("flordb", "flordb.log (FlorDB), commit at the end"),
}


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
        repo = git_sandbox({"w3.py": "# W3 logging loop\n"})
        os.chdir(repo)
        sys.argv = ["w3.py"]
        # flordb.log prints every value; a terminal would cost more than /dev/null (a lower bound).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        import flordb

        return flordb.commit, repo
    return None, None


def fit_once(variant: str, cfg: LogConfig, sandbox: str, ckpt_dir: str) -> dict[str, Any]:
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
    callbacks: list[pl.Callback] = [timer]
    recorder = flor.FlorCallback(checkpoint_dir=f"{ckpt_dir}/flor") if variant == "flor" else None
    writer_cpu = [0.0]
    if recorder is not None:
        callbacks.append(recorder)
        _time_log_writes(writer_cpu)
    logger_seconds = [0.0]
    csv = TimedCSVLogger(f"{ckpt_dir}/csv") if variant == "csv" else None
    if csv is not None:
        _time_logger_connector(logger_seconds)
    close, scratch = _peer_setup(variant, ckpt_dir)
    trainer = pl.Trainer(
        max_epochs=1,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=csv if csv is not None else False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = clock()
    trainer.fit(model, data)
    fit_seconds = clock() - start
    start = clock()
    if close is not None:
        close()
    flush = clock() - start + (csv.finalize_seconds if csv is not None else 0.0)
    if scratch is not None:
        remove(scratch)
    return {
        "variant": variant,
        "loop_seconds": timer.train_end - timer.train_start,
        "fit_seconds": fit_seconds,
        "outer_seconds": model.seconds[0],
        "inner_seconds": model.seconds[1],
        "log_calls": model.log_calls,
        "logger_seconds": logger_seconds[0],
        "flush_seconds": flush,
        "writer_cpu": writer_cpu[0] if recorder else None,
        "rows_stored": _rows(recorder) if recorder else None,
    }


def run(
    cfg: LogConfig, *, progress: bool = True, quiet_wait: float = 20.0, variants: tuple[str, ...] = VARIANTS
) -> list[dict[str, Any]]:
    """Interleave ``variants`` ``cfg.repeats`` times; return every fit's result.

    A peer whose package is missing, or whose fit fails, is skipped with its reason, as a row
    ``{"variant": name, "skipped": reason}``.
    """
    sandbox = git_sandbox({"train.py": Path(__file__).read_text()})
    workdir = sandbox.parent / f"{sandbox.name}-peers"  # kept across fits: mlflow's store is created once
    workdir.mkdir()
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {v: why for v in variants if (why := _missing(v))}
    try:
        for r in range(cfg.repeats):
            for variant in (v for v in variants if v not in skipped):
                if quiet_wait > 0:
                    wait_until_quiet(max_wait=quiet_wait)  # the machine may be shared: start in a lull
                try:
                    res = run_forked(fit_once, variant, cfg, str(sandbox), str(workdir))
                except RuntimeError as err:
                    if variant not in PEERS:
                        raise
                    skipped[variant] = f"its fit failed: {str(err).strip().splitlines()[-1]}"
                    results = [x for x in results if x["variant"] != variant]
                    continue
                finally:
                    remove(workdir / "flor")
                    remove(workdir / "csv")
                res["repeat"] = r
                results.append(res)
                if progress:
                    print(f"  log_cost {r + 1}/{cfg.repeats} {variant}: loop {res['loop_seconds']:.2f} s", flush=True)
    finally:
        remove(sandbox)
        remove(workdir)
    for variant, why in skipped.items():
        print(f"  log_cost: {variant} SKIPPED: {why}", flush=True)
    return results + [{"variant": v, "skipped": why} for v, why in skipped.items()]


def _missing(variant: str) -> str | None:
    """Why a peer cannot run here, or None."""
    if variant not in PEERS:
        return None
    module = PEERS[variant][0]
    if importlib.util.find_spec(module) is None:
        return f"package {module!r} is not installed (pip install -c requirements-cpu.txt -e '.[bench]')"
    return None


def _us(seconds: float, calls: int) -> float:
    return seconds / calls * 1e6


def report(cfg: LogConfig, results: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Markdown lines for the section and whether the target (training-thread time per call) held."""
    lines, ok = _flor_report(cfg, [r for r in results if "skipped" not in r])
    return [*lines, "", *peer_report(cfg, results)], ok


def _flor_report(cfg: LogConfig, results: list[dict[str, Any]]) -> tuple[list[str], bool]:
    plain = [r for r in results if r["variant"] == "plain"]
    flor_ = [r for r in results if r["variant"] == "flor"]
    calls = plain[0]["log_calls"]
    floor = median([_us(r["outer_seconds"] - r["inner_seconds"], calls) for r in plain])
    in_call = [_us(r["outer_seconds"] - r["inner_seconds"], calls) - floor for r in flor_]
    writer = [_us(r["writer_cpu"], max(r["rows_stored"], 1)) for r in flor_]
    total = [a + b for a, b in zip(in_call, writer, strict=True)]
    pairs = list(zip(plain, flor_, strict=True))
    wall = [_us(f["loop_seconds"] - p["loop_seconds"], calls) for p, f in pairs]
    plain_loop_us = [_us(r["loop_seconds"], calls) for r in plain]
    noise_s = f"{max(plain_loop_us) - min(plain_loop_us):.2f}" if len(plain) > 1 else "n/a, 1 repeat"
    lines = [
        f"### Cost per `self.log` call: {cfg.values} scalars/step x {cfg.steps} steps = {calls} calls per fit, "
        f"{cfg.repeats} interleaved repeats",
        "",
        "| variant | train loop s | Lightning's own self.log, µs/call | whole fit s | values flor stored |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, rs in (("plain", plain), ("flor", flor_)):
        stored = ", ".join(str(r["rows_stored"]) for r in rs) if variant == "flor" else "-"
        lines.append(
            f"| {variant} | {spread([r['loop_seconds'] for r in rs])} "
            f"| {spread([_us(r['inner_seconds'], calls) for r in rs], '{:.1f}')} "
            f"| {spread([r['fit_seconds'] for r in rs])} | {stored} |"
        )
    ok = median(in_call) <= TARGET_US
    lines += [
        "",
        "| added by flor, µs per self.log call | median [min-max] |",
        "| --- | --- |",
        f"| training thread, inside the call (flor's `log` wrapper) | {spread(in_call, '{:.2f}')} |",
        f"| log-writer thread CPU per value stored (background flushes) | {spread(writer, '{:.2f}')} |",
        f"| total CPU per value, both threads | {spread(total, '{:.2f}')} |",
        f"| A/B train-loop wall, paired by repeat (plain's own spread: {noise_s} µs/call) | {spread(wall, '{:.2f}')} |",
        "",
        f"- target: time flor adds to each self.log call ≤ {TARGET_US:.0f} µs — {median(in_call):.2f} µs "
        f"→ {verdict(ok)}",
        f"- stricter, counting the background log writer too: {median(total):.2f} µs "
        f"→ {verdict(median(total) <= TARGET_US)}",
        f"- cross-check, A/B wall: {median(wall):.2f} µs → {verdict(median(wall) <= TARGET_US)} "
        f"(resolution limited by plain's run-to-run spread: {noise_s} µs/call)",
    ]
    if any(r["rows_stored"] != r["log_calls"] for r in flor_):
        lines.append("- **WARNING**: flor stored a different number of values than self.log calls made")
    return lines, ok


def per_value(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """µs each variant adds per logged value, per repeat (see the module docstring); plain is the floor."""
    by = {v: [r for r in results if r["variant"] == v and "skipped" not in r] for v in VARIANTS}
    floor = median([_us(r["outer_seconds"] - r["inner_seconds"], r["log_calls"]) for r in by["plain"]])
    out: dict[str, list[float]] = {}
    out["flor (training thread)"] = [_us(r["outer_seconds"] - r["inner_seconds"], r["log_calls"]) - floor
                                     for r in by["flor"]]  # fmt: skip
    out["flor (both threads)"] = [
        a + _us(r["writer_cpu"], max(r["rows_stored"], 1))
        for a, r in zip(out["flor (training thread)"], by["flor"], strict=True)
    ]
    out["csv"] = [_us(r["logger_seconds"] + r["flush_seconds"], r["log_calls"]) for r in by["csv"]]
    for v in ("mlflow", "flordb"):
        out[v] = [_us(r["outer_seconds"] + r["flush_seconds"], r["log_calls"]) - floor for r in by[v]]
    return out


def _ratios(xs: list[float], base: list[float]) -> list[float]:
    return [x / b for x, b in zip(xs, base, strict=False) if b > 0]


def peer_report(cfg: LogConfig, results: list[dict[str, Any]]) -> list[str]:
    """The peers side by side with flor: µs per logged value and the ratio to flor's."""
    costs = per_value(results)
    flor_total = costs["flor (both threads)"]
    calls = {r["variant"]: r["log_calls"] for r in results if "skipped" not in r}
    lines = [
        f"### Cost per logged value: flor vs the loggers users pick instead ({cfg.values} scalars per step, "
        f"interleaved; mlflow runs {cfg.slow_steps} steps, the others {cfg.steps})",
        "",
        "| variant | what is timed | values per fit | µs per value, median [min-max] | ratio to flor (both threads) |",
        "| --- | --- | --- | --- | --- |",
        f"| flor | its self.log wrapper on the training thread | {calls.get('flor', '-')} "
        f"| {spread(costs['flor (training thread)'], '{:.2f}')} | - |",
        f"| flor | + its background log writer's CPU | {calls.get('flor', '-')} | {spread(flor_total, '{:.2f}')} | 1 |",
    ]
    timed = {
        "csv": "Lightning's logging path per step (tensors to floats, CSVLogger.log_metrics, save) + finalize",
        "mlflow": "each mlflow.log_metric(name, value.item(), step=...) call + end_run",
        "flordb": "each flordb.log(name, value.item()) call (its print to /dev/null) + flordb.commit()",
    }
    for v, what in timed.items():
        skipped = next((r["skipped"] for r in results if r["variant"] == v and "skipped" in r), None)
        if skipped or not costs[v]:
            lines.append(f"| {v} | SKIPPED: {skipped or 'not run'} | - | - | - |")
            continue
        lines.append(f"| {v} | {what} | {calls[v]} | {spread(costs[v], '{:.1f}')} "
                     f"| {spread(_ratios(costs[v], flor_total), '{:.1f}')}x |")  # fmt: skip
    lines += [
        "",
        "- Lightning's own `self.log` (hundreds of µs here) is paid by every variant that uses it and is not counted; "
        "mlflow and flordb replace `self.log` by their own call in the same training step.",
    ]
    return lines


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md."""
    costs = per_value(results)
    flor_call, flor_total = costs["flor (training thread)"], costs["flor (both threads)"]
    rows: list[dict[str, Any]] = [
        {
            "id": "w3_self_log",
            "comparison": "W3 flor's added cost per `self.log` value, training thread (µs)",
            "measured": spread(flor_call, "{:.2f}"),
            "target": f"≤ {TARGET_US:.0f} µs",
            "ok": median(flor_call) <= TARGET_US,
        },
        {
            "id": "w3_both_threads",
            "comparison": "W3 the same, counting flor's background log writer's CPU too (µs)",
            "measured": spread(flor_total, "{:.2f}"),
            "target": f"(≤ {TARGET_US:.0f} µs)",
            "ok": None,
        },
    ]
    names = {"csv": "CSVLogger (log_every_n_steps=1)", "mlflow": "mlflow.log_metric → sqlite", "flordb": "flordb.log"}
    for v, name in names.items():
        skipped = next((r["skipped"] for r in results if r["variant"] == v and "skipped" in r), None)
        ratio = spread(_ratios(costs[v], flor_total), "{:.1f}") + "x" if costs[v] else "-"
        rows.append({
            "id": f"w3_vs_{v}",
            "comparison": f"W3 {name} cost per value ÷ flor's (both threads)",
            "measured": f"SKIPPED: {skipped}" if skipped else ratio,
            "target": "- (> 1: flor cheaper)",
            "ok": None,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (< 30 s)")
    parser.add_argument("--steps", type=int, help="training steps per fit")
    parser.add_argument("--repeats", type=int, help="fits per variant")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else LogConfig()
    cfg = LogConfig(args.steps or cfg.steps, cfg.values, args.repeats or cfg.repeats, cfg.batch, cfg.slow_steps)
    lines, _ = report(cfg, run(cfg, quiet_wait=0.0 if args.smoke else 20.0))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
