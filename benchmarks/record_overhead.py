"""W1: what recording with FlorCallback costs versus plain Lightning, ModelCheckpoint and MLflow autolog,
side by side in one run; W3 (log_cost.py) follows as a section. How it measures: benchmarks/README.md.

Usage: ``python benchmarks/record_overhead.py [--smoke] [--repeats N] [--epochs N] [--out PATH]``
(``--help`` for the rest: a subset of variants, re-rendering a saved run, shared-machine guards).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _harness
import lightning
import lightning.pytorch as pl
import log_cost
import torch
from _harness import clock, median, spread, table, target
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from log_cost import EpochTimer, quiet_lightning
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "flor", "plain_long", "flor_auto", "modelckpt", "modelckpt_async", "mlflow")
PEERS = {"mlflow": "mlflow"}  # variant: the package it needs (from the optional extra .[bench])
PEER_NAMES = {
    "modelckpt": "ModelCheckpoint(every_n_epochs=1, save_top_k=-1)",
    "modelckpt_async": "ModelCheckpoint + AsyncCheckpointIO",
    "mlflow": "MLflow Lightning autolog (sqlite, checkpoint every epoch)",
}
TARGET_OVERHEAD = 0.02  # flor's epoch overhead, fraction of plain's epoch time
TARGET_VS_MODELCKPT = 0.5  # flor's overhead as a fraction of ModelCheckpoint's
AUTO_EPOCHS = 3  # flor_auto fits run 3x the epochs, so that their measured epochs span its checkpoint period
LONG = ("plain_long", "flor_auto")  # the variants that run AUTO_EPOCHS times the epochs
OTHER_LOAD_LIMIT = 0.2  # CPUs busy with other work during a fit above which its timing is suspect


def base_of(variant: str, present: Iterable[str]) -> str:
    """The plain variant ``variant``'s overhead is measured against: flor_auto against plain fits
    as long as its own (later epochs of a long fit need not take what the first ones take)."""
    return "plain_long" if variant == "flor_auto" and "plain_long" in present else "plain"


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
        sizes = itertools.pairwise([in_dim, hidden, hidden, in_dim, classes])  # Linear, ReLU, ..., Linear
        self.net = torch.nn.Sequential(*[m for a, b in sizes for m in (torch.nn.Linear(a, b), torch.nn.ReLU())][:-1])

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

EPOCH_HOOKS = (
    "on_train_epoch_start",  # the snapshot of the previous epoch (and the wait for its predecessor's write)
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_end",
    "on_train_batch_start",
    "on_validation_batch_start",
)
FIT_HOOKS = ("setup", "on_train_start", "on_train_end", "teardown")
STEPS = {  # FlorCallback.stats fields timed on the training thread, and their label in the breakdown
    "blocked_seconds": "checkpoint wait (blocked_seconds)",
    "state_seconds": "dump_state (Lightning)",
    "rng_seconds": "rng.capture",
    "snapshot_seconds": "snapshot copy (clone tensors)",
    "store_seconds": "sqlite insert (run/epoch row)",
    "code_seconds": "git snapshot",
}


class TimedFlorCallback(flor.FlorCallback):
    """FlorCallback whose hooks time themselves, and the growth of ``stats`` inside each.

    ``seconds[what][epoch]``: the seconds of ``"hook <name>"`` or of a :data:`STEPS` label in that epoch.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds: dict[str, dict[str, float]] = {}

    def bench_steps(self) -> list[float]:
        stats = self.stats
        return [getattr(stats, name) for name in STEPS]

    def bench_add(self, what: str, epoch: int, seconds: float) -> None:
        by_epoch = self.seconds.setdefault(what, {})
        by_epoch[str(epoch)] = by_epoch.get(str(epoch), 0.0) + seconds  # str: as it comes back from the .json


def _timed_hook(name: str) -> Any:
    def hook(self: TimedFlorCallback, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        before, start = self.bench_steps(), clock()
        try:
            return getattr(flor.FlorCallback, name)(self, trainer, *args, **kwargs)
        finally:
            self.bench_add(f"hook {name}", trainer.current_epoch, clock() - start)
            for label, a, b in zip(STEPS.values(), before, self.bench_steps(), strict=True):
                if b > a:
                    self.bench_add(label, trainer.current_epoch, b - a)

    hook.__name__ = name
    return hook


for _name in EPOCH_HOOKS + FIT_HOOKS:
    setattr(TimedFlorCallback, _name, _timed_hook(_name))


def _flor_report(cb: TimedFlorCallback) -> dict[str, Any]:
    sql = "SELECT epoch, write_seconds, size FROM checkpoints WHERE run_id = ? ORDER BY epoch"
    with contextlib.closing(sqlite3.connect(cb.location.db_path)) as conn:  # the location of the run it recorded
        rows = conn.execute(sql, (cb.run_id,)).fetchall()
    stats = cb.stats
    keep = ("writer_cpu_seconds", "blocked_seconds", "checkpoint_every")
    return {"seconds": cb.seconds, "checkpoints": rows, **{k: getattr(stats, k) for k in keep}}


# ---- one fit -----------------------------------------------------------------------------


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
    mlflow.pytorch.autolog(log_models=False, log_datasets=False, checkpoint=True, checkpoint_save_best_only=False,
                           checkpoint_save_weights_only=False, checkpoint_save_freq="epoch", silent=True)  # fmt: skip


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
        callbacks.append(recorder)
    elif variant.startswith("modelckpt"):
        callbacks.append(ModelCheckpoint(dirpath=f"{workdir}/modelckpt", every_n_epochs=1, save_top_k=-1))
    elif variant == "mlflow":
        _mlflow_autolog(workdir)
    plugins = [AsyncCheckpointIO()] if variant == "modelckpt_async" else None
    trainer = pl.Trainer(max_epochs=cfg.epochs * (AUTO_EPOCHS if variant in LONG else 1), accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=variant.startswith("modelckpt"), enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, plugins=plugins)  # fmt: skip
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
    sandbox = _harness.git_sandbox({"train.py": Path(__file__).read_text(), "README.md": "benchmark sandbox\n"})
    workdir = sandbox.parent / f"{sandbox.name}-out"
    budget = [retries]

    def fit_once(variant: str) -> dict[str, Any]:
        os.sync()  # settle write-back of earlier checkpoints before the next fit starts
        load_before = _harness.wait_until_quiet(max_wait=quiet_wait) if quiet_wait > 0 else None  # a shared machine
        try:
            res = _harness.run_forked(fit_w1, variant, cfg, str(sandbox), str(workdir))
            return res | {"other_load_before": load_before}
        finally:
            _harness.remove(workdir)

    def fit(variant: str) -> dict[str, Any]:  # redone while other work disturbed it and redos are left
        res, redone = fit_once(variant), 0
        while res["other_load"] > OTHER_LOAD_LIMIT and budget[0] > 0:
            print(f"  W1 {variant}: other work kept {res['other_load']:.2f} CPUs busy; redoing", flush=True)
            budget[0], redone = budget[0] - 1, redone + 1
            res = fit_once(variant)
        return res | {"redone": redone}

    def describe(res: dict[str, Any]) -> str:
        return (f"fit {res['fit_seconds']:6.2f} s, epochs 1.. median {median(res['periods'][1:]):.3f} s, "
                f"other load {res['other_load']:.2f} CPUs")  # fmt: skip

    try:
        # Warm-up: loads lazily imported code from disk and lets the guest kernel touch page-cache
        # memory once (first-touch writes cost several times more on this VM), so round 1 is not special.
        fit_once("flor")
        return _harness.interleave(variants, cfg.repeats, fit, describe, PEERS)
    finally:
        _harness.remove(sandbox)
        _harness.remove(workdir)


# ---- report ------------------------------------------------------------------------------


def _overheads(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: its measured epochs (1..E-1, pooled), overhead against its base, and per-fit figures."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for v, rs in by.items():
        base = by[base_of(v, by)]
        epochs, plain = ([p for r in fits for p in r["periods"][1:]] for fits in (rs, base))
        rounds = [median(r["periods"][1:]) / median(b["periods"][1:]) - 1 for r, b in zip(rs, base, strict=True)]
        out[v] = {"epochs": epochs, "overhead": median(epochs) / median(plain) - 1, "rounds": rounds}
        out[v] |= {k: [r[field] for r in rs] for k, field in FIT_FIGURES.items()}
    return out


FIT_FIGURES = {"fits": "fit_seconds", "rss": "peak_rss_mib", "cpu": "cpu_seconds", "disk": "disk_mb",
               "other": "other_load"}  # fmt: skip
MAIN_HEADER = (
    "variant | epoch s, median [min-max] | overhead vs plain (flor_auto: vs plain_long), per-round [min-max] "
    "| fit s, median [min-max] | peak RSS MiB (Δ plain) | CPU s/fit (Δ its base) | written MB/fit | other load, CPUs"
)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _main_row(v: str, o: dict[str, Any], ov: dict[str, dict[str, Any]]) -> list[Any]:
    overhead = "-" if v == "plain" else f"{_pct(o['overhead'])} [{_pct(min(o['rounds']))}-{_pct(max(o['rounds']))}]"
    rss, cpu, base = median(o["rss"]), median(o["cpu"]), ov[base_of(v, ov)]
    return [v, spread(o["epochs"]), overhead, spread(o["fits"], "{:.2f}"),
            f"{rss:.0f} ({rss - median(ov['plain']['rss']):+.0f})", f"{cpu:.1f} ({cpu - median(base['cpu']):+.1f})",
            f"{median(o['disk']):.0f}", spread(o["other"], "{:.2f}")]  # fmt: skip


def _flor_breakdown(results: list[dict[str, Any]], variant: str, plain_epoch: float) -> list[str]:
    """Where flor's time goes: training-thread time per measured epoch, once per fit, in the background."""
    fits = [r for r in results if r["variant"] == variant]
    seen = {w for r in fits for w, by in r["flor"]["seconds"].items() if any(int(e) > 0 for e in by)}
    hooks = [f"hook {h}" for h in EPOCH_HOOKS if f"hook {h}" in seen]
    inner = sorted(w for w in seen if not w.startswith("hook "))

    def per_epoch(names: list[str]) -> list[float]:
        return [sum(r["flor"]["seconds"].get(n, {}).get(str(e), 0.0) for n in names)
                for r in fits for e in range(1, len(r["periods"]))]  # fmt: skip

    parts = [("training thread in flor hooks (total)", hooks), *((f"  {h}", [h]) for h in hooks)]
    parts += [(f"  inside a hook: {w}", [w]) for w in inner]
    rows = [[label, spread(xs := per_epoch(names), "{:.4f}"), f"{median(xs) / plain_epoch * 100:.2f}%"]
            for label, names in parts]  # fmt: skip
    full = [c for r in fits for c in r["flor"]["checkpoints"] if c[0] >= 0]  # epoch -1: initial state
    size = median([c[2] for c in full]) if full else float("nan")
    cpu = [r["flor"]["writer_cpu_seconds"] * size / sum(c[2] for c in r["flor"]["checkpoints"]) for r in fits
           if r["flor"]["checkpoints"]]  # fmt: skip
    rows.append([f"background checkpoint-writer CPU per {size / 1e6:.0f} MB checkpoint (writer_cpu_seconds, pro rata)",
                 spread(cpu), f"{median(cpu) / plain_epoch * 100:.1f}% of one core"])  # fmt: skip
    rows.append(["background write wall per checkpoint", spread([c[1] for c in full]), "-"])
    once = [[h, spread([sum(r["flor"]["seconds"].get(h, {}).values()) for r in fits])] for h in FIT_TIMED]
    waited, written = [r["flor"]["blocked_seconds"] for r in fits], [len(r["flor"]["checkpoints"]) for r in fits]
    return [
        *table(f"{variant}, per measured epoch (epochs 1..E-1) | seconds, median [min-max] | % of plain epoch", rows),
        "",
        *table(f"{variant}, once per fit (git snapshot: inside the hook that opens the run) | seconds", once),
        "",
        f"- FlorCallback.stats per fit: training thread blocked on an earlier write {spread(waited)} s; checkpoints "
        f"written (initial state included) {spread(written, '{:.0f}')}; final checkpoint period "
        f"{sorted({r['flor']['checkpoint_every'] for r in fits})}",
    ]


FIT_TIMED = [f"hook {h}" for h in FIT_HOOKS] + [STEPS["code_seconds"]]


def _quiet_rounds(fits: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The fits of the rounds in which no fit was disturbed by other work (more than ``OTHER_LOAD_LIMIT``
    CPUs busy with anything else), and the number of rounds: a round's variants compare with its own plain."""
    noisy = {r["repeat"] for r in fits if r["other_load"] > OTHER_LOAD_LIMIT}
    return [r for r in fits if r["repeat"] not in noisy], len({r["repeat"] for r in fits})


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md: W1's targets and comparisons (judged on quiet rounds only)."""
    skipped = {r["variant"]: r["skipped"] for r in results if "skipped" in r}
    quiet, n_rounds = _quiet_rounds(fits := [r for r in results if "skipped" not in r])
    ov = _overheads(quiet or fits)
    if not {"plain", "flor"} <= ov.keys():
        return []
    judged = f" ({len({r['repeat'] for r in quiet})} of {n_rounds} rounds quiet)" if quiet else " (UNJUDGED: every "
    judged += "" if quiet else "round disturbed by other work)"

    def ratios(variant: str) -> list[float]:  # its overhead over ModelCheckpoint's, round by round
        return [f / p for f, p in zip(ov[variant]["rounds"], ov["modelckpt"]["rounds"], strict=True) if p > 0]

    def vs_modelckpt(variant: str) -> bool | None:
        mc = ov.get("modelckpt", {}).get("overhead", 0)
        return (mc > 0 and ov[variant]["overhead"] <= TARGET_VS_MODELCKPT * mc) if quiet else None

    def overhead_row(id: str, variant: str, comparison: str) -> dict[str, Any]:
        o, ok = ov[variant], ov[variant]["overhead"] <= TARGET_OVERHEAD if quiet else None
        measured = f"{_pct(o['overhead'])} [{_pct(min(o['rounds']))}-{_pct(max(o['rounds']))}]"
        return target(id, comparison + judged, measured, f"≤ {TARGET_OVERHEAD:.0%}", ok)

    rows = [overhead_row("w1_overhead", "flor", "W1 record overhead per epoch, flor vs plain Lightning")]
    for v, name in PEER_NAMES.items():
        if v not in ov:
            measured = f"SKIPPED: {skipped.get(v, 'not run')}"
        else:  # flor's overhead over the peer's, round by round
            ratio = [f / p for f, p in zip(ov["flor"]["rounds"], ov[v]["rounds"], strict=True) if p > 0]
            measured = spread(ratio, "{:.2f}") if ratio else "n/a (its overhead ≤ 0)"
            measured += f" (its overhead {_pct(ov[v]['overhead'])})"
        judge = (f"≤ {TARGET_VS_MODELCKPT}", vs_modelckpt("flor")) if v == "modelckpt" else ()
        rows.append(target(f"w1_vs_{v}", f"W1 flor's overhead ÷ {name}'s", measured, *judge))
    if "flor_auto" in ov:
        comparison = f'W1 the same with FlorCallback(checkpoint_every="auto") (2% budget), {AUTO_EPOCHS}x the epochs, '
        rows.append(overhead_row("w1_auto_overhead", "flor_auto", comparison + "vs plain fits as long"))
        ratio = ratios("flor_auto") if "modelckpt" in ov else []
        measured = spread(ratio, "{:.2f}") if ratio else "n/a (ModelCheckpoint's overhead ≤ 0 or not run)"
        comparison = 'W1 flor (checkpoint_every="auto") overhead ÷ ModelCheckpoint\'s'
        rows.append(target("w1_auto_vs_modelckpt", comparison, measured, f"≤ {TARGET_VS_MODELCKPT}",
                           vs_modelckpt("flor_auto")))  # fmt: skip
    rss = ", ".join(f"{v} {median(o['rss']) - median(ov['plain']['rss']):+.0f}" for v, o in ov.items() if v != "plain")
    return [*rows, target("w1_rss", "W1 peak RSS over plain (MiB)", rss)]


def report(cfg: W1Config, results: list[dict[str, Any]]) -> list[str]:
    skipped = [f"- {r['variant']} SKIPPED: {r['skipped']}" for r in results if "skipped" in r]
    results = [r for r in results if "skipped" not in r]
    ov, first = _overheads(results), results[0]
    busy = [r["other_load"] for r in results if r["other_load"] > OTHER_LOAD_LIMIT]
    lines = [
        "## Recording overhead: flor_lightning vs plain Lightning",
        "",
        f"{_harness.machine()}; torch {torch.__version__} ({first['torch_threads']} threads), "
        f"lightning {lightning.__version__}.",
        "",
        f"### W1: {first['params'] / 1e6:.2f}M params, {first['state_mb']:.0f} MB training state "
        f"(weights + Adam), batch {cfg.batch}, {cfg.train_batches}+{cfg.val_batches} batches/epoch, "
        f"{cfg.epochs} epochs x {cfg.repeats} interleaved repeats per variant",
        "",
        "Epoch = period between successive epoch starts; epochs 1..E-1 pooled (epoch 0 is warm-up). "
        "Overhead = variant median / plain median - 1 (flor_auto and plain_long run "
        f"{AUTO_EPOCHS}x the epochs, to span flor_auto's period: flor_auto is against plain_long); per round, each "
        "against its round's plain. Each fit runs in its own forked child; peak RSS is its VmHWM, CPU s all its "
        "threads. Other load = CPUs kept busy meanwhile by anything else (from /proc/stat).",
        "",
        *table(MAIN_HEADER, [_main_row(v, o, ov) for v, o in ov.items()]),
        "",
        *skipped,
        f"- {sum(r.get('redone', 0) for r in results)} fits redone because other work kept the CPUs busy; "
        f"{len(busy)} of {len(results)} fits ran with more than {OTHER_LOAD_LIMIT} CPUs busy with other work "
        "(the targets are judged on the rounds with none)",
    ]
    for variant in (v for v in ov if v.startswith("flor")):
        lines += ["", *_flor_breakdown(results, variant, median(ov["plain"]["epochs"]))]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 epochs, 1 repeat (< 30 s)")
    parser.add_argument("--repeats", type=int, help="fits per variant (default 4)")
    parser.add_argument("--epochs", type=int, help="epochs per fit (default 6)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run, plain first; the targets need plain, flor and modelckpt")  # fmt: skip
    parser.add_argument("--no-log-cost", action="store_true", help="skip the per-self.log section (W3)")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="seconds to wait before each fit for other work to stop (0: never; smoke: 0)")  # fmt: skip
    parser.add_argument("--retries", type=int, default=4,
                        help="fits that may be redone in all when other work disturbed them (smoke: 0)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="markdown output (default: benchmarks/results/record_overhead.md; "
                        "none in --smoke mode); raw results go beside it as .json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.variants[0] != "plain":
        parser.error("--variants must start with plain: every overhead is measured against it")
    cfg = SMOKE if args.smoke else W1Config()
    cfg = W1Config(**{**asdict(cfg), "repeats": args.repeats or cfg.repeats, "epochs": args.epochs or cfg.epochs})
    log_cfg = log_cost.SMOKE if args.smoke else log_cost.LogConfig()
    wait = 0.0 if args.smoke else args.quiet_wait
    started = time.perf_counter()
    w1 = run_w1(cfg, tuple(args.variants), quiet_wait=wait, retries=0 if args.smoke else args.retries)
    logs = [] if args.no_log_cost else log_cost.run(log_cfg, quiet_wait=wait)
    lines = [*report(cfg, w1), *(["", *log_cost.report(log_cfg, logs)] if logs else [])]
    text = "\n".join([*lines, "", f"(benchmark wall time {time.perf_counter() - started:.0f} s)"]) + "\n"
    raw = {"config": asdict(cfg), "log_config": asdict(log_cfg), "w1": w1, "log_cost": logs}
    raw["targets"] = targets(w1) + (log_cost.targets(logs) if logs else [])
    _harness.write_results(args.out or (None if args.smoke else HERE / "results" / "record_overhead.md"), text, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
