"""What FlorCallback adds to each ``self.log`` call: a tiny model logging many scalars per step.

Plain Lightning and FlorCallback fits alternate (plain, flor, plain, flor, ...), each in a
fresh forked child with a fresh Trainer. Lightning's own ``self.log`` costs hundreds of µs per
call on a small CPU, so an A/B wall-clock difference cannot resolve a few µs; the added cost
is therefore measured two ways:

* CPU accounting (precise, judged): the module's ``log`` is overridden to time Lightning's
  own work ("inner"); the training step times each whole ``self.log`` call ("outer"). flor's
  wrapper sits between the two, so ``outer - inner`` is the time it adds on the training
  thread (the plain fits give the timer's own floor, subtracted). Added to it: the CPU time of
  flor's log-writer thread per value stored (read from the thread's CPU clock at train end).
* A/B wall clock (cross-check): (flor train loop - plain train loop) / calls, paired by repeat.

Run alone: ``python benchmarks/log_cost.py [--smoke]``; record_overhead.py runs it as a section.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import threading
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
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor

TARGET_US = 5.0


@dataclass(frozen=True)
class LogConfig:
    steps: int = 300
    values: int = 50
    repeats: int = 3
    batch: int = 8


SMOKE = LogConfig(steps=40, values=50, repeats=1)


class ManyScalars(pl.LightningModule):
    """A linear model whose training step logs ``n`` scalar tensors, timing each call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)
        self.names = [f"metric_{i:02d}" for i in range(n)]
        self.register_buffer("scales", torch.arange(1, n + 1, dtype=torch.float32))
        # [outer, inner] seconds: whole self.log calls as the training step sees them, and Lightning's
        # own LightningModule.log. A list, mutated in place: nn.Module.__setattr__ would cost µs per call.
        self.seconds = [0.0, 0.0]
        self.log_calls = 0

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        start = clock()
        super().log(name, value, *args, **kwargs)
        self.seconds[1] += clock() - start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        for name, value in zip(self.names, (loss.detach() * self.scales).unbind(), strict=True):
            start = clock()
            self.log(name, value)
            self.seconds[0] += clock() - start
        self.log_calls += len(self.names)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class WriterProbe(pl.Callback):
    """At train end, read the CPU time of flor's log-writer thread and the rows it has committed."""

    def __init__(self, recorder: flor.FlorCallback) -> None:
        self.recorder = recorder
        self.writer_cpu = float("nan")
        self.rows_committed = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        thread = next((t for t in threading.enumerate() if t.name == "flor-log-writer"), None)
        if thread is not None and thread.ident is not None:
            self.writer_cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        self.rows_committed = _rows(self.recorder)


def _rows(recorder: flor.FlorCallback) -> int:
    if recorder.location is None:
        return 0
    with sqlite3.connect(recorder.location.db_path) as conn:
        return int(conn.execute("SELECT count(*) FROM logs WHERE run_id = ?", (recorder.run_id,)).fetchone()[0])


def fit_once(variant: str, cfg: LogConfig, sandbox: str, ckpt_dir: str) -> dict[str, Any]:
    """One fit in a forked child: ``variant`` is 'plain' or 'flor'."""
    os.chdir(sandbox)
    quiet_lightning()
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = cfg.steps * cfg.batch
    data = DataLoader(TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 1, generator=g)), cfg.batch)
    model = ManyScalars(cfg.values)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    recorder = flor.FlorCallback(checkpoint_dir=ckpt_dir) if variant == "flor" else None
    probe = WriterProbe(recorder) if recorder is not None else None
    if recorder is not None and probe is not None:
        callbacks += [probe, recorder]
    trainer = pl.Trainer(
        max_epochs=1,
        max_steps=cfg.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = clock()
    trainer.fit(model, data)
    fit_seconds = clock() - start
    return {
        "variant": variant,
        "loop_seconds": timer.train_end - timer.train_start,
        "fit_seconds": fit_seconds,
        "outer_seconds": model.seconds[0],
        "inner_seconds": model.seconds[1],
        "log_calls": model.log_calls,
        "writer_cpu": probe.writer_cpu if probe else None,
        "rows_at_train_end": probe.rows_committed if probe else None,
        "rows_stored": _rows(recorder) if recorder else None,
    }


def run(cfg: LogConfig, *, progress: bool = True, quiet_wait: float = 20.0) -> list[dict[str, Any]]:
    """Alternate plain and flor fits ``cfg.repeats`` times; return every fit's result."""
    sandbox = git_sandbox({"train.py": Path(__file__).read_text()})
    results = []
    try:
        for r in range(cfg.repeats):
            for variant in ("plain", "flor"):
                if quiet_wait > 0:
                    wait_until_quiet(max_wait=quiet_wait)  # the machine may be shared: start in a lull
                res = run_forked(fit_once, variant, cfg, str(sandbox), str(sandbox / ".ckpt"))
                remove(sandbox / ".ckpt")
                res["repeat"] = r
                results.append(res)
                if progress:
                    print(f"  log_cost {r + 1}/{cfg.repeats} {variant}: loop {res['loop_seconds']:.2f} s", flush=True)
    finally:
        remove(sandbox)
    return results


def _us(seconds: float, calls: int) -> float:
    return seconds / calls * 1e6


def report(cfg: LogConfig, results: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Markdown lines for the section and whether the target (training-thread time per call) held."""
    plain = [r for r in results if r["variant"] == "plain"]
    flor_ = [r for r in results if r["variant"] == "flor"]
    calls = plain[0]["log_calls"]
    floor = median([_us(r["outer_seconds"] - r["inner_seconds"], calls) for r in plain])
    in_call = [_us(r["outer_seconds"] - r["inner_seconds"], calls) - floor for r in flor_]
    writer = [_us(r["writer_cpu"], max(r["rows_at_train_end"], 1)) for r in flor_]
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
        f"| log-writer thread CPU per value (background; upper bound) | {spread(writer, '{:.2f}')} |",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (< 30 s)")
    parser.add_argument("--steps", type=int, help="training steps per fit")
    parser.add_argument("--repeats", type=int, help="fits per variant")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else LogConfig()
    cfg = LogConfig(args.steps or cfg.steps, cfg.values, args.repeats or cfg.repeats, cfg.batch)
    lines, _ = report(cfg, run(cfg, quiet_wait=0.0 if args.smoke else 20.0))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
