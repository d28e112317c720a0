"""What recording with FlorCallback costs versus plain Lightning, side by side in one run.

Workload W1: an MLP with ~8.4M float32 parameters trained with Adam, so ~100 MB of training
state (33.6 MB weights + 67.2 MB Adam moments) is checkpointed every epoch; synthetic data
from a fixed seed; epochs of a few seconds on a 2-core CPU. Seven variants run interleaved
(plain, flor, plain_long, flor_auto, modelckpt, modelckpt_async, mlflow; plain, ...), each fit in a
fresh child forked from this process (see _harness.py), with a fresh Trainer:

* plain: ``enable_checkpointing=False, logger=False``
* flor: ``FlorCallback()`` checkpointing every epoch into a temp dir, run inside a temp git repo
* plain_long: plain with 3x the epochs, the baseline of flor_auto
* flor_auto: ``FlorCallback(checkpoint_every="auto")``: the initial state and the last epoch, in
  between as often as a 2% CPU budget allows; it runs 3x the epochs so that its measured epochs
  span a checkpoint period, and is compared with plain_long (epoch medians of fits as long)
* modelckpt: ``ModelCheckpoint(every_n_epochs=1, save_top_k=-1)``
* modelckpt_async: the same with ``plugins=[AsyncCheckpointIO()]``
* mlflow: ``mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False)`` into a
  sqlite tracking store (a full checkpoint every epoch; skipped with its reason where mlflow,
  from the optional extra ``.[bench]``, is not installed)

Epoch time is the period from one ``on_train_epoch_start`` to the next (the last epoch: to
``on_train_end``), taken by a timing callback attached first. Every period of epochs 1..E-1
then holds exactly one checkpoint of each checkpointing variant (flor snapshots epoch e-1 as
epoch e starts; ModelCheckpoint saves epoch e as it ends); epoch 0 is warm-up and reported
apart. flor's final checkpoint and its wait at teardown count in the whole-fit time.

A second section (log_cost.py) measures the added cost per ``self.log`` call.

Usage: ``python benchmarks/record_overhead.py [--smoke] [--repeats N] [--epochs N] [--out PATH]``
(``--help`` for the rest: experiments with proposed fixes, re-rendering a saved run, shared-machine guards).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import log_cost
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning._lightning as flor_internals
import flor_lightning.callback as flor_callback
import flor_lightning.checkpoints as flor_checkpoints
import flor_lightning.codeversion as flor_codeversion
import flor_lightning.rng as flor_rng
import flor_lightning.store as flor_store
from flor_lightning import FlorCallback
from flor_lightning.checkpoints import CheckpointStore

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "flor", "plain_long", "flor_auto", "modelckpt", "modelckpt_async", "mlflow")
PEERS = {"mlflow": "mlflow"}  # variant: the package it needs (from the optional extra .[bench])
# Opt-in (--variants): a proposed fix tried without editing the package, patched in the child only.
EXPERIMENTS = {
    "flor_nice": "FlorCallback with its checkpoint-writer thread at nice 19",
    "flor_dontneed": "FlorCallback dropping each checkpoint from the page cache after its fsync",
    "flor_lean": "flor_dontneed, and torch.save without its zip CRC32 (flor keeps a sha256 anyway)",
}
TARGET_OVERHEAD = 0.02  # flor's epoch overhead, fraction of plain's epoch time
TARGET_VS_MODELCKPT = 0.5  # flor's overhead as a fraction of ModelCheckpoint's
AUTO_EPOCHS = 3  # flor_auto fits run 3x the epochs, so that their measured epochs span its checkpoint period
LONG = ("plain_long", "flor_auto")  # the variants that run AUTO_EPOCHS times the epochs


def base_of(variant: str, present: Iterable[str]) -> str:
    """The plain variant ``variant``'s overhead is measured against: flor_auto against plain fits
    as long as its own (later epochs of a long fit need not take what the first ones take)."""
    return "plain_long" if variant == "flor_auto" and "plain_long" in present else "plain"


OTHER_LOAD_LIMIT = 0.2  # CPUs busy with other work during a fit above which its timing is suspect


@dataclass(frozen=True)
class W1Config:
    in_dim: int = 1024
    hidden: int = 2048
    classes: int = 10
    batch: int = 256
    train_batches: int = 16
    val_batches: int = 2
    epochs: int = 6
    repeats: int = 4


SMOKE = W1Config(in_dim=64, hidden=128, batch=32, train_batches=4, val_batches=1, epochs=2, repeats=1)


# ---- the workload ------------------------------------------------------------------------


class W1Module(pl.LightningModule):
    def __init__(self, in_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, in_dim),
            torch.nn.ReLU(),
            torch.nn.Linear(in_dim, classes),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def w1_data(cfg: W1Config) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Synthetic classification data from a fixed seed: labels from a random linear teacher."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(cfg.in_dim, cfg.classes, generator=g)

    def make(batches: int) -> TensorDataset:
        x = torch.randn(batches * cfg.batch, cfg.in_dim, generator=g)
        return TensorDataset(x, (x @ teacher).argmax(dim=1))

    train, val = make(cfg.train_batches), make(cfg.val_batches)
    return DataLoader(train, cfg.batch, shuffle=True), DataLoader(val, cfg.batch)


# ---- flor, timed from the inside ----------------------------------------------------------

_EPOCH_HOOKS = (
    "on_train_epoch_start",  # the snapshot of the previous epoch (and the wait for its predecessor's write)
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_end",
    "on_train_batch_start",
    "on_validation_batch_start",
)
_FIT_HOOKS = ("setup", "on_train_start", "on_train_end", "teardown")


class TimedFlorCallback(FlorCallback):
    """FlorCallback whose hooks (and the steps inside its checkpoint) record their durations.

    ``events`` holds ``(what, epoch, seconds)``; the totals come from the public ``FlorCallback.stats``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events: list[tuple[str, int, float]] = []
        self.epoch = 0

    def record(self, what: str, seconds: float) -> None:
        self.events.append((what, self.epoch, seconds))

    def instrument(self) -> None:
        """Time flor's internal steps; this process is a throwaway child, so patching is contained."""
        flor_callback.snapshot = self._timed(flor_callback.snapshot, "snapshot copy (clone tensors)")
        flor_codeversion.commit_code = self._timed(flor_codeversion.commit_code, "git snapshot")
        flor_internals.dump_state = self._timed(flor_internals.dump_state, "dump_state (Lightning)")
        flor_rng.capture = self._timed(flor_rng.capture, "rng.capture")
        flor_store.insert = self._timed(flor_store.insert, "sqlite insert (run/epoch/checkpoint row)")

    def _timed(self, fn: Any, what: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                main = threading.current_thread() is threading.main_thread()
                self.record(what if main else f"[writer thread] {what}", clock() - start)

        return timed

    def blocked(self) -> float:
        return self.stats.blocked_seconds


def _timed_hook(name: str) -> Any:
    def hook(self: TimedFlorCallback, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        self.epoch = trainer.current_epoch
        blocked, start = self.blocked(), clock()
        try:
            return getattr(FlorCallback, name)(self, trainer, *args, **kwargs)
        finally:
            self.record(f"hook {name}", clock() - start)
            if self.blocked() > blocked:
                self.record("checkpoint wait (blocked_seconds)", self.blocked() - blocked)

    hook.__name__ = name
    return hook


for _name in _EPOCH_HOOKS + _FIT_HOOKS:
    setattr(TimedFlorCallback, _name, _timed_hook(_name))


def _flor_report(cb: TimedFlorCallback) -> dict[str, Any]:
    rows: list[tuple[int, float, int]] = []
    if cb.location is not None:
        with sqlite3.connect(cb.location.db_path) as conn:
            sql = "SELECT epoch, write_seconds, size FROM checkpoints WHERE run_id = ? ORDER BY epoch"
            rows = conn.execute(sql, (cb.run_id,)).fetchall()
    stats = cb.stats
    return {
        "events": cb.events,
        "writer_cpu_seconds": stats.writer_cpu_seconds,
        "blocked_seconds": stats.blocked_seconds,
        "checkpoint_every": stats.checkpoint_every,
        "checkpoints": rows,
    }


# ---- one fit -----------------------------------------------------------------------------


def _patch_experiment(variant: str) -> None:
    """Try a proposed fix to flor's checkpoint writer; this process is a throwaway child."""
    if variant == "flor_nice":
        write = CheckpointStore._write

        def nice_write(self: CheckpointStore, *args: Any) -> None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
            write(self, *args)

        CheckpointStore._write = nice_write  # type: ignore[method-assign]
    if variant in ("flor_dontneed", "flor_lean"):
        fsync = flor_checkpoints._fsync

        def fsync_and_drop(f: Any) -> None:
            fsync(f)
            # Written once, read only by a replay: free its page-cache pages for the next checkpoint.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

        flor_checkpoints._fsync = fsync_and_drop
    if variant == "flor_lean":
        from torch.utils.serialization import config

        config.save.compute_crc32 = False


def _mlflow_autolog(workdir: str) -> None:
    """MLflow's Lightning autolog into a sqlite tracking store, a full checkpoint every epoch.

    The store and experiment are created before the fit (not timed); ``log_models`` and
    ``log_datasets`` are off: they log once at the end of a fit, not per epoch.
    """
    import logging

    import mlflow
    import mlflow.pytorch

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("w1", artifact_location=f"{workdir}/mlartifacts"))
    mlflow.pytorch.autolog(
        log_models=False,
        log_datasets=False,
        checkpoint=True,
        checkpoint_save_best_only=False,
        checkpoint_save_weights_only=False,
        checkpoint_save_freq="epoch",
        silent=True,
    )


def fit_w1(variant: str, cfg: W1Config, sandbox: str, workdir: str) -> dict[str, Any]:
    """One fit of W1 in a forked child; returns timings and, for flor, what flor itself spent."""
    os.chdir(sandbox)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    quiet_lightning()
    pl.seed_everything(0, verbose=False)
    model = W1Module(cfg.in_dim, cfg.hidden, cfg.classes)
    train, val = w1_data(cfg)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    recorder = None
    if variant.startswith("flor"):
        every = "auto" if variant == "flor_auto" else 1
        recorder = TimedFlorCallback(checkpoint_dir=f"{workdir}/flor", checkpoint_every=every)
        recorder.instrument()
        callbacks.append(recorder)
        _patch_experiment(variant)
    elif variant.startswith("modelckpt"):
        callbacks.append(ModelCheckpoint(dirpath=f"{workdir}/modelckpt", every_n_epochs=1, save_top_k=-1))
    elif variant == "mlflow":
        _mlflow_autolog(workdir)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs * (AUTO_EPOCHS if variant in LONG else 1),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=variant.startswith("modelckpt"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[AsyncCheckpointIO()] if variant == "modelckpt_async" else None,
    )
    start = clock()
    trainer.fit(model, train, val)
    fit_seconds = clock() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant,
        "periods": timer.periods(),
        "fit_seconds": fit_seconds,
        "params": params,
        "state_mb": params * 4 * 3 / 1e6,  # weights + Adam's exp_avg and exp_avg_sq, float32
        "disk_mb": sum(f.stat().st_size for f in Path(workdir).rglob("*") if f.is_file()) / 1e6,
        "torch_threads": torch.get_num_threads(),
        "flor": _flor_report(recorder) if recorder is not None else None,
    }


def run_w1(
    cfg: W1Config, variants: tuple[str, ...] = VARIANTS, *, quiet_wait: float = 20.0, retries: int = 0
) -> list[dict[str, Any]]:
    """Interleave ``variants`` ``cfg.repeats`` times after one unreported warm-up fit; return every fit.

    For a shared machine: before each fit, wait up to ``quiet_wait`` seconds for a moment when other
    work leaves the CPUs idle, and redo a fit during which other work kept more than
    ``OTHER_LOAD_LIMIT`` CPUs busy, at most ``retries`` times in all. A peer (:data:`PEERS`) that is
    not installed, or whose fit fails, is skipped: a row ``{"variant": name, "skipped": reason}``.
    """
    sandbox = git_sandbox({"train.py": Path(__file__).read_text(), "README.md": "benchmark sandbox\n"})
    workdir = sandbox.parent / f"{sandbox.name}-out"
    results: list[dict[str, Any]] = []
    skipped = {v: f"package {PEERS[v]!r} is not installed (pip install -c requirements-cpu.txt -e '.[bench]')"
               for v in variants if v in PEERS and importlib.util.find_spec(PEERS[v]) is None}  # fmt: skip
    budget = [retries]

    def fit(variant: str) -> dict[str, Any]:
        os.sync()  # settle write-back of earlier checkpoints before the next fit starts
        load_before = wait_until_quiet(max_wait=quiet_wait) if quiet_wait > 0 else None  # a shared machine
        try:
            res = run_forked(fit_w1, variant, cfg, str(sandbox), str(workdir))
        finally:
            remove(workdir)
        res["other_load_before"] = load_before
        return res

    try:
        # Warm-up: loads lazily imported code from disk and lets the guest kernel touch page-cache
        # memory once (first-touch writes cost several times more on this VM), so round 1 is not special.
        fit("flor")
        for r in range(cfg.repeats):
            for variant in (v for v in variants if v not in skipped):
                try:
                    res = _fit_redone(fit, variant, budget)
                except RuntimeError as err:
                    if variant not in PEERS:
                        raise
                    skipped[variant] = f"its fit failed: {str(err).strip().splitlines()[-1]}"
                    results = [x for x in results if x["variant"] != variant]
                    print(f"  W1 {variant} SKIPPED: {skipped[variant]}", flush=True)
                    continue
                res["repeat"] = r
                results.append(res)
                print(
                    f"  W1 round {r + 1}/{cfg.repeats} {variant:15s} fit {res['fit_seconds']:6.2f} s, "
                    f"epochs 1.. median {median(res['periods'][1:]):.3f} s, other load {res['other_load']:.2f} CPUs",
                    flush=True,
                )
    finally:
        remove(sandbox)
        remove(workdir)
    return results + [{"variant": v, "skipped": why} for v, why in skipped.items()]


def _fit_redone(fit: Any, variant: str, budget: list[int]) -> dict[str, Any]:
    """``fit(variant)``, redone while other work disturbed it and ``budget[0]`` redos are left."""
    res, redone = fit(variant), 0
    while res["other_load"] > OTHER_LOAD_LIMIT and budget[0] > 0:
        print(f"  W1 {variant}: other work kept {res['other_load']:.2f} CPUs busy; redoing", flush=True)
        budget[0], redone = budget[0] - 1, redone + 1
        res = fit(variant)
    res["redone"] = redone
    return res


# ---- report ------------------------------------------------------------------------------


def _measured(res: dict[str, Any]) -> list[float]:
    return list(res["periods"][1:])


def _bootstrap(xs: list[float], base: list[float], n: int = 2000) -> tuple[float, float]:
    """90% bootstrap interval of (median(xs) - median(base)) / median(base), resampling epochs."""
    rng = random.Random(0)
    draws = sorted(
        (median(rng.choices(xs, k=len(xs))) - (b := median(rng.choices(base, k=len(base))))) / b for _ in range(n)
    )
    return draws[int(0.05 * n)], draws[int(0.95 * n) - 1]


def _overheads(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {v: [r for r in results if r["variant"] == v] for v in variants}
    out: dict[str, dict[str, Any]] = {}
    for v, rs in by.items():
        base_fits = by[base_of(v, by)]
        plain_epochs = [p for r in base_fits for p in _measured(r)]
        plain_fit = median([r["fit_seconds"] for r in base_fits])
        epochs = [p for r in rs for p in _measured(r)]
        rounds = []
        for r, p in zip(rs, base_fits, strict=True):
            base = median(_measured(p))
            rounds.append((median(_measured(r)) - base) / base)
        out[v] = {
            "epochs": epochs,
            "warmup": [r["periods"][0] for r in rs],
            "overhead": (median(epochs) - median(plain_epochs)) / median(plain_epochs),
            "ci": _bootstrap(epochs, plain_epochs),
            "rounds": rounds,
            "fits": [r["fit_seconds"] for r in rs],
            "fit_overhead": (median([r["fit_seconds"] for r in rs]) - plain_fit) / plain_fit,
            "rss": [r["peak_rss_mib"] for r in rs],
            "cpu": [r["cpu_seconds"] for r in rs],
            "disk": [r["disk_mb"] for r in rs],
            "other": [r["other_load"] for r in rs],
        }
    return out


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _main_table(ov: dict[str, dict[str, Any]]) -> list[str]:
    plain_rss, plain_cpu = median(ov["plain"]["rss"]), median(ov["plain"]["cpu"])
    lines = [
        "| variant | epoch s, median [min-max] | overhead vs plain (flor_auto: vs plain_long) [90% CI] "
        "| per-round overhead [min-max] "
        "| epoch 0 s | fit s, median [min-max] | fit overhead | peak RSS MiB (Δ plain) | CPU s/fit (Δ plain) "
        "| written MB/fit | other load, CPUs (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, o in ov.items():
        if v == "plain":
            overhead = rounds = fit_overhead = "-"
        else:
            overhead = f"{_pct(o['overhead'])} [{_pct(o['ci'][0])}, {_pct(o['ci'][1])}]"
            rounds = f"{_pct(min(o['rounds']))}-{_pct(max(o['rounds']))}"
            fit_overhead = _pct(o["fit_overhead"])
        cpu_delta = f"{median(o['cpu']) - plain_cpu:+.1f}"
        if v in LONG:  # AUTO_EPOCHS times the epochs: whole fits compare with plain_long's only
            base = base_of(v, ov)
            long_cpu = median(ov[base]["cpu"])
            fit_overhead = f"{fit_overhead} vs {base}" if base == "plain_long" else f"n/a ({AUTO_EPOCHS}x epochs)"
            cpu_delta = f"{median(o['cpu']) - long_cpu:+.1f} vs {base}" if base == "plain_long" else fit_overhead
        lines.append(
            f"| {v} | {spread(o['epochs'])} | {overhead} | {rounds} | {median(o['warmup']):.2f} "
            f"| {spread(o['fits'], '{:.2f}')} | {fit_overhead} "
            f"| {median(o['rss']):.0f} ({median(o['rss']) - plain_rss:+.0f}) "
            f"| {median(o['cpu']):.1f} ({cpu_delta}) | {median(o['disk']):.0f} "
            f"| {median(o['other']):.2f} ({max(o['other']):.2f}) |"
        )
    return lines


_FIT_LABELS = {
    "hook setup": "setup",
    "hook on_train_start": "on_train_start",
    "git snapshot": "  git snapshot (shadow branch), inside the hook that opens the run",
    "hook on_train_end": "on_train_end (snapshot of the last epoch)",
    "hook teardown": "teardown (wait for the last write, close the log writer)",
}


def _per_epoch(fits: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds flor spent on the training thread in each measured epoch: by hook, then by inner step."""
    total = "training thread in flor hooks (total)"
    out: dict[str, list[float]] = {total: []}
    seen = {w for r in fits for w, ep, _ in r["flor"]["events"] if ep > 0 and not w.startswith("[")}
    hooks = [f"hook {h}" for h in _EPOCH_HOOKS if f"hook {h}" in seen]
    inner = sorted(w for w in seen if not w.startswith("hook "))
    for r in fits:
        for e in range(1, len(r["periods"])):
            evs = [(w, s) for w, ep, s in r["flor"]["events"] if ep == e]
            out[total].append(sum(s for w, s in evs if w in hooks))
            for name in hooks + inner:
                label = f"  {name}" if name in hooks else f"  inside a hook: {name}"
                out.setdefault(label, []).append(sum(s for w, s in evs if w == name))
    return out


def _flor_breakdown(results: list[dict[str, Any]], variant: str, plain_epoch: float) -> list[str]:
    """Where flor's time goes: training-thread time per measured epoch, once per fit, in the background."""
    fits = [r for r in results if r["variant"] == variant]
    lines = [
        f"| {variant}, per measured epoch (epochs 1..E-1, all fits) | seconds, median [min-max] | % of plain epoch |",
        "| --- | --- | --- |",
    ]
    for what, xs in _per_epoch(fits).items():
        lines.append(f"| {what} | {spread(xs, '{:.4f}')} | {median(xs) / plain_epoch * 100:.2f}% |")
    full = [c for r in fits for c in r["flor"]["checkpoints"] if c[0] >= 0]  # epoch -1: initial state
    size = median([c[2] for c in full]) if full else float("nan")
    cpu_per = [  # None: the checkpoint store could not be reached (reported as n/a)
        r["flor"]["writer_cpu_seconds"] * size / sum(c[2] for c in r["flor"]["checkpoints"])
        for r in fits
        if r["flor"]["writer_cpu_seconds"] is not None and r["flor"]["checkpoints"]
    ]
    lines += [
        f"| background checkpoint-writer CPU per {size / 1e6:.0f} MB checkpoint (writer_cpu_seconds, pro rata) "
        f"| {spread(cpu_per, '{:.3f}')} | {median(cpu_per) / plain_epoch * 100:.1f}% of one core |",
        f"| background write wall per checkpoint (serialize + sha256 + fsync + rename) "
        f"| {spread([c[1] for c in full], '{:.3f}')} | - |",
        "",
        f"| {variant}, once per fit | seconds, median [min-max] |",
        "| --- | --- |",
    ]
    for what, label in _FIT_LABELS.items():
        xs = [sum(s for w, _, s in r["flor"]["events"] if w == what) for r in fits]
        lines.append(f"| {label} | {spread(xs, '{:.3f}')} |")
    waited = [r["flor"]["blocked_seconds"] for r in fits]
    written = [len(r["flor"]["checkpoints"]) for r in fits]
    periods = sorted({r["flor"]["checkpoint_every"] for r in fits})
    lines += [
        "",
        f"- FlorCallback.stats per fit: training thread blocked on an earlier write {spread(waited)} s; "
        f"checkpoints written (initial state included) {spread(written, '{:.0f}')}; final checkpoint period {periods}",
    ]
    return lines


def _contamination(results: list[dict[str, Any]]) -> list[str]:
    busy = [r["other_load"] for r in results if r["other_load"] > OTHER_LOAD_LIMIT]
    redone = sum(r.get("redone", 0) for r in results)
    lines = [f"- {redone} fits were redone because other work kept the CPUs busy during them"] if redone else []
    if not busy:
        return lines
    return [
        *lines,
        f"- **WARNING**: {len(busy)} of {len(results)} fits ran while other work kept more than "
        f"{OTHER_LOAD_LIMIT} CPUs busy (up to {max(busy):.2f} of {os.cpu_count()}); their times are inflated "
        "by that, not by the variant. Rerun on a quiet machine before trusting the overheads.",
    ]


def _targets(ov: dict[str, dict[str, Any]]) -> tuple[list[str], bool]:
    if not {"flor", "modelckpt", "modelckpt_async"} <= ov.keys():
        return ["- targets: not judged (they need the variants flor, modelckpt and modelckpt_async)"], False
    flor_ovh, mc_ovh = ov["flor"]["overhead"], ov["modelckpt"]["overhead"]
    async_ovh = ov["modelckpt_async"]["overhead"]
    ok1 = flor_ovh <= TARGET_OVERHEAD
    ok2 = flor_ovh <= TARGET_VS_MODELCKPT * mc_ovh
    ratio = f"{flor_ovh / mc_ovh:.2f}" if mc_ovh > 0 else "n/a (ModelCheckpoint overhead ≤ 0)"
    ratio_async = f"{flor_ovh / async_ovh:.2f}" if async_ovh > 0 else "n/a (its overhead ≤ 0)"
    lo, hi = ov["flor"]["ci"]
    mlflow_ovh = ov.get("mlflow", {}).get("overhead", float("nan"))
    ratio_mlflow = f"{flor_ovh / mlflow_ovh:.2f}" if mlflow_ovh > 0 else "n/a (not run, or its overhead ≤ 0)"
    lines = [
        f"- flor overhead / ModelCheckpoint overhead = {ratio}; "
        f"flor / (ModelCheckpoint + AsyncCheckpointIO) = {ratio_async}; flor / MLflow autolog = {ratio_mlflow}",
        f"- target: flor epoch overhead ≤ {TARGET_OVERHEAD:.0%} of plain — {_pct(flor_ovh)} → {verdict(ok1)}",
        f"- target: flor overhead ≤ ½ of ModelCheckpoint's — {_pct(flor_ovh)} vs ½ x {_pct(mc_ovh)} → {verdict(ok2)}",
    ]
    if lo <= TARGET_OVERHEAD <= hi:
        lines.append(
            f"- note: flor's 90% interval [{_pct(lo)}, {_pct(hi)}] contains the {TARGET_OVERHEAD:.0%} line; "
            "this run cannot settle the first target either way"
        )
    return lines, ok1 and ok2


def _machine(results: list[dict[str, Any]]) -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "flor_lightning"], cwd=HERE.parent, capture_output=True)
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({model}), torch {torch.__version__} "
        f"({results[0]['torch_threads']} threads), lightning {lightning.__version__}, python "
        f"{platform.python_version()}, flor_lightning at {sha.stdout.strip() or '?'}"
        f"{' (modified)' if dirty.stdout.strip() else ''}"
    )


def _round_ratios(ov: dict[str, dict[str, Any]], peer: str, flor: str = "flor") -> list[float]:
    """``flor``'s overhead over ``peer``'s, round by round (rounds where the peer's overhead is positive)."""
    return [f / p for f, p in zip(ov[flor]["rounds"], ov[peer]["rounds"], strict=True) if p > 0]


def _quiet_rounds(fits: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The fits of the rounds in which no fit was disturbed by other work, and the number of rounds.

    A round's variants are compared with its own plain fit; a round where other processes kept more
    than ``OTHER_LOAD_LIMIT`` CPUs busy during any fit measures them, not the variants.
    """
    rounds = sorted({r["repeat"] for r in fits})
    noisy = {r["repeat"] for r in fits if r["other_load"] > OTHER_LOAD_LIMIT}
    return [r for r in fits if r["repeat"] not in noisy], len(rounds)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md: W1's targets and comparisons."""
    skipped = {r["variant"]: r["skipped"] for r in results if "skipped" in r}
    fits = [r for r in results if "skipped" not in r]
    quiet, n_rounds = _quiet_rounds(fits)
    ov = _overheads(quiet or fits)
    if not {"plain", "flor"} <= ov.keys():
        return []
    flor_ovh = ov["flor"]["overhead"]
    rounds = ov["flor"]["rounds"]
    n_quiet = len({r["repeat"] for r in quiet})
    judged = f" ({n_quiet} of {n_rounds} rounds quiet)" if quiet else " (UNJUDGED: other work disturbed every round)"
    rows: list[dict[str, Any]] = [
        {
            "id": "w1_overhead",
            "comparison": "W1 record overhead per epoch, flor vs plain Lightning" + judged,
            "measured": f"{_pct(flor_ovh)} [{_pct(min(rounds))}-{_pct(max(rounds))}]",
            "target": f"≤ {TARGET_OVERHEAD:.0%}",
            "ok": flor_ovh <= TARGET_OVERHEAD if quiet else None,
        }
    ]
    peers = {
        "modelckpt": "ModelCheckpoint(every_n_epochs=1, save_top_k=-1)",
        "modelckpt_async": "ModelCheckpoint + AsyncCheckpointIO",
        "mlflow": "MLflow Lightning autolog (sqlite, checkpoint every epoch)",
    }
    for v, name in peers.items():
        row: dict[str, Any] = {
            "id": f"w1_vs_{v}",
            "comparison": f"W1 flor's overhead ÷ {name}'s",
            "target": "-",
            "ok": None,
        }
        if v == "modelckpt":
            ok = ov.get(v, {}).get("overhead", 0) > 0 and flor_ovh <= TARGET_VS_MODELCKPT * ov[v]["overhead"]
            row |= {"target": f"≤ {TARGET_VS_MODELCKPT}", "ok": ok if quiet else None}
        if v in ov:
            rounds_ratio = _round_ratios(ov, v)  # median and range over rounds, each against its own plain fit
            row["measured"] = spread(rounds_ratio, "{:.2f}") + " " if rounds_ratio else "n/a (its overhead ≤ 0) "
            row["measured"] += f"(its overhead {_pct(ov[v]['overhead'])})"
        else:
            row["measured"] = f"SKIPPED: {skipped.get(v, 'not run')}"
        rows.append(row)
    if "flor_auto" in ov:
        auto, auto_rounds = ov["flor_auto"]["overhead"], ov["flor_auto"]["rounds"]
        ratio = _round_ratios(ov, "modelckpt", "flor_auto") if "modelckpt" in ov else []
        rows += [
            {
                "id": "w1_auto_overhead",
                "comparison": 'W1 the same with FlorCallback(checkpoint_every="auto") (2% budget), '
                f"{AUTO_EPOCHS}x the epochs, vs plain fits as long" + judged,
                "measured": f"{_pct(auto)} [{_pct(min(auto_rounds))}-{_pct(max(auto_rounds))}]",
                "target": f"≤ {TARGET_OVERHEAD:.0%}",
                "ok": auto <= TARGET_OVERHEAD if quiet else None,
            },
            {
                "id": "w1_auto_vs_modelckpt",
                "comparison": 'W1 flor (checkpoint_every="auto") overhead ÷ ModelCheckpoint\'s',
                "measured": spread(ratio, "{:.2f}") if ratio else "n/a (ModelCheckpoint's overhead ≤ 0 or not run)",
                "target": f"≤ {TARGET_VS_MODELCKPT}",
                "ok": ov.get("modelckpt", {}).get("overhead", 0) > 0
                and auto <= TARGET_VS_MODELCKPT * ov["modelckpt"]["overhead"]
                if quiet
                else None,
            },
        ]
    rss = {v: median(o["rss"]) - median(ov["plain"]["rss"]) for v, o in ov.items() if v != "plain"}
    rows.append({
        "id": "w1_rss",
        "comparison": "W1 peak RSS over plain (MiB)",
        "measured": ", ".join(f"{v} {x:+.0f}" for v, x in rss.items()),
        "target": "-",
        "ok": None,
    })  # fmt: skip
    return rows


def report(cfg: W1Config, results: list[dict[str, Any]], log_lines: list[str]) -> list[str]:
    skipped = [f"- {r['variant']} SKIPPED: {r['skipped']}" for r in results if "skipped" in r]
    results = [r for r in results if "skipped" not in r]
    ov = _overheads(results)
    first = results[0]
    quiet, n_rounds = _quiet_rounds(results)
    target_lines, _ = _targets(_overheads(quiet) if quiet else ov)
    n_quiet = len({r["repeat"] for r in quiet})
    judged = (
        f"- targets judged on the {n_quiet} of {n_rounds} rounds in which no fit was disturbed by other work "
        f"(other load ≤ {OTHER_LOAD_LIMIT} CPUs)"
        if quiet
        else "- targets UNJUDGED: other work disturbed every round; the lines below use every fit"
    )
    target_lines.insert(0, judged)
    if "flor_auto" in ov:
        target_lines.insert(
            1,
            f"- flor_auto fits run {AUTO_EPOCHS}x the epochs (so that the measured epochs span its checkpoint "
            "period), and so do plain_long's: flor_auto's overheads are against plain_long (plain_long's own, "
            "against plain, shows how the later epochs of a long fit differ)"
            if "plain_long" in ov
            else f"- flor_auto fits run {AUTO_EPOCHS}x the epochs; without plain_long its overheads are against "
            "plain's shorter fits",
        )
    plain_epoch = median(ov["plain"]["epochs"])
    lines = [
        "## Recording overhead: flor_lightning vs plain Lightning",
        "",
        f"{_machine(results)}.",
        "",
        f"### W1: {first['params'] / 1e6:.2f}M params, {first['state_mb']:.0f} MB training state "
        f"(weights + Adam), batch {cfg.batch}, {cfg.train_batches}+{cfg.val_batches} batches/epoch, "
        f"{cfg.epochs} epochs x {cfg.repeats} interleaved repeats per variant",
        "",
        "Epoch = period between successive epoch starts; epochs 1..E-1 pooled (epoch 0 is warm-up). "
        "Overhead = (variant median - plain median) / plain median; its 90% CI bootstraps the epochs. "
        "Each fit runs in its own forked child; peak RSS is that child's VmHWM (reset at fork), "
        "CPU s = all its threads. Other load = CPUs kept busy meanwhile by anything else "
        "(other processes, hypervisor steal), from /proc/stat.",
        "",
        *_main_table(ov),
        "",
        *skipped,
        *_contamination(results),
        *target_lines,
    ]
    for variant in (v for v in ov if v.startswith("flor")):
        lines += ["", *_flor_breakdown(results, variant, plain_epoch)]
    return [*lines, "", *log_lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 epochs, 1 repeat (< 30 s)")
    parser.add_argument("--repeats", type=int, help="fits per variant (default 4)")
    parser.add_argument("--epochs", type=int, help="epochs per fit (default 6)")
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *EXPERIMENTS], default=list(VARIANTS),
                        help=f"variants to run, plain first; the targets need plain, flor and modelckpt. "
                        f"Experiments: {EXPERIMENTS}")  # fmt: skip
    parser.add_argument("--no-log-cost", action="store_true", help="skip the per-self.log section")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait before each fit for other work to stop (0: never; smoke: 0)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=4,
                        help="fits that may be redone in all when other work disturbed them (smoke: 0)")  # fmt: skip
    parser.add_argument("--render", type=Path, help="print the report of an earlier run's raw .json, run nothing")
    parser.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/record_overhead.md; "
                        "none in --smoke mode); raw results go beside it as .json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.variants[0] != "plain":
        parser.error("--variants must start with plain: every overhead is measured against it")
    out = args.out or (None if args.smoke else HERE / "results" / "record_overhead.md")
    if args.render:
        raw = json.loads(args.render.read_text())
    else:
        cfg = SMOKE if args.smoke else W1Config()
        cfg = W1Config(**{**asdict(cfg), "repeats": args.repeats or cfg.repeats, "epochs": args.epochs or cfg.epochs})
        log_cfg = log_cost.SMOKE if args.smoke else log_cost.LogConfig()
        wait = 0.0 if args.smoke else args.quiet_wait
        started = time.perf_counter()
        raw = {
            "config": asdict(cfg),
            "log_config": asdict(log_cfg),
            "w1": run_w1(cfg, tuple(args.variants), quiet_wait=wait, retries=0 if args.smoke else args.retries),
        }
        raw["log_cost"] = [] if args.no_log_cost else log_cost.run(log_cfg, quiet_wait=wait)
        raw["wall_seconds"] = time.perf_counter() - started
        if out is not None:  # raw results first: the report can be rendered again with --render
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    log_lines = log_cost.report(log_cost.LogConfig(**raw["log_config"]), raw["log_cost"])[0] if raw["log_cost"] else []
    lines = report(W1Config(**raw["config"]), raw["w1"], log_lines)
    lines += ["", f"(benchmark wall time {raw['wall_seconds']:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print("\n" + text, end="")
    raw["targets"] = targets(raw["w1"]) + (log_cost.targets(raw["log_cost"]) if raw["log_cost"] else [])
    if out is not None:
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
