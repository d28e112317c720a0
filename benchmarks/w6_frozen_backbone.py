"""W6: fine-tuning a small head on a large frozen backbone, a checkpoint every epoch (issue 17).

The backbone is an MLP 1024-2048-2048-1024 (8.4M float32 parameters, 33.6 MB), built from a fixed seed as
pretrained weights would be loaded, and frozen; the head is a Linear(1024, 10) trained with Adam. Measured:

* bytes flor writes per checkpoint after the first (the ``size`` the checkpoint index records: its new pack plus
  its manifest) against the trainable state (head weights + Adam's two moments);
* two fine-tunes from the same backbone (other learning rates) recorded under one checkpoint root: the bytes on
  disk, and in how many packs each backbone tensor lies (1: stored once);
* the recording overhead, interleaved with plain Lightning and ``ModelCheckpoint(every_n_epochs=1,
  save_top_k=-1)``: the median epoch time after the first, each variant's fit in a forked child.

Usage: ``python benchmarks/w6_frozen_backbone.py [--repeats N] [--epochs N] [--smoke] [--out PATH]``. Benchmarks
are not timed tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from _harness import clock, git_sandbox, interleave, machine, median, remove, run_forked, spread, table
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor
from flor_lightning._blobs import content_hash

VARIANTS = ("plain", "flor", "modelckpt")


@dataclass(frozen=True)
class W6Config:
    dims: tuple[int, ...] = (1024, 2048, 2048, 1024)  # the backbone's layer widths
    classes: int = 10
    batches: int = 24  # training batches per epoch
    batch_size: int = 64
    epochs: int = 6
    repeats: int = 3


SMOKE = W6Config(dims=(32, 64, 32), batches=4, batch_size=8, epochs=2, repeats=1)


class Finetune(pl.LightningModule):
    """A frozen backbone (the same weights in every run: a fixed seed) and a trainable head."""

    def __init__(self, cfg: W6Config, lr: float) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # "pretrained": the same backbone for every fine-tune
            layers: list[nn.Module] = []
            for a, b in zip(cfg.dims, cfg.dims[1:], strict=False):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.backbone = nn.Sequential(*layers)
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(cfg.dims[-1], cfg.classes)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.backbone(x)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)


class EpochStarts(pl.Callback):
    """The time each training epoch starts, and the fit's end."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(clock())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(clock())


def fit(variant: str, cfg: W6Config, workdir: str, lr: float = 1e-3) -> dict[str, Any]:
    """One fit; its epoch periods (each holds one checkpoint) and the trainable state's bytes."""
    pl.seed_everything(0, verbose=False)
    model = Finetune(cfg, lr)
    g = torch.Generator().manual_seed(0)
    n = cfg.batches * cfg.batch_size
    data = TensorDataset(torch.randn(n, cfg.dims[0], generator=g), torch.randint(0, cfg.classes, (n,), generator=g))
    timer = EpochStarts()
    callbacks: list[pl.Callback] = [timer]
    recorder = flor.FlorCallback(checkpoint_dir=f"{workdir}/flor", checkpoint_every=1)
    if variant == "flor":
        callbacks.append(recorder)
    elif variant == "modelckpt":
        callbacks.append(ModelCheckpoint(dirpath=f"{workdir}/modelckpt", every_n_epochs=1, save_top_k=-1))
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=variant == "modelckpt", enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=cfg.batch_size, shuffle=True))
    head = sum(p.numel() * p.element_size() for p in model.head.parameters())
    return {
        "variant": variant,
        "periods": list(np.diff(timer.starts)),
        "trainable_bytes": 3 * head,  # weights + Adam's exp_avg and exp_avg_sq
        "backbone": [content_hash(t.detach()) for t in model.backbone.state_dict().values()],
        "backbone_bytes": sum(t.numel() * t.element_size() for t in model.backbone.state_dict().values()),
        "disk_bytes": sum(f.stat().st_size for f in Path(workdir).rglob("*") if f.is_file()),
        "flor_stats": asdict(recorder.stats),  # flor's own costs (zeros for the other variants)
    }


def fit_in(sandbox: str, variant: str, cfg: W6Config, runs: int = 1) -> dict[str, Any]:
    """``runs`` fits of ``variant`` in the sandbox (forked: one child per call), sharing one checkpoint root."""
    os.chdir(sandbox)
    workdir = f"{sandbox}-out"
    Path(workdir).mkdir(exist_ok=True)
    try:
        results = [fit(variant, cfg, workdir, lr=1e-3 * (1 + 2 * i)) for i in range(runs)]
        if variant == "flor":
            results[-1]["checkpoints"] = _checkpoint_rows(Path(sandbox) / ".flor" / "flor.db")
            results[-1]["packs_holding"] = _packs_holding(Path(workdir) / "flor" / "packs")
        return results[-1] | {"runs": runs}
    finally:
        remove(workdir)
        remove(Path(sandbox) / ".flor")


def _checkpoint_rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        got = conn.execute("SELECT run_id, epoch, size FROM checkpoints ORDER BY run_id, epoch").fetchall()
    finally:
        conn.close()
    return [{"run_id": r, "epoch": e, "size": s} for r, e, s in got]


def _packs_holding(folder: Path) -> dict[str, int]:
    """Blob hash -> how many pack files hold it (read from the packs' safetensors headers)."""
    count: dict[str, int] = {}
    for pack in folder.glob("*.safetensors"):
        with pack.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for blob in header.keys() - {"__metadata__"}:
            count[blob] = count.get(blob, 0) + 1
    return count


def run(cfg: W6Config) -> dict[str, Any]:
    sandbox = git_sandbox({"train.py": Path(__file__).read_text(), ".gitignore": ".flor/\n"})
    try:
        two = run_forked(fit_in, str(sandbox), "flor", cfg, 2)
        timed = interleave(
            VARIANTS,
            cfg.repeats,
            lambda v: run_forked(fit_in, str(sandbox), v, cfg),
            lambda r: f"epoch after the first {median(r['periods'][1:]):.3f} s",
            {},
        )
    finally:
        remove(sandbox)
    return {"config": asdict(cfg), "two_runs": two, "timed": timed}


def render(raw: dict[str, Any], smoke: bool) -> str:
    two, cfg = raw["two_runs"], W6Config(**{**raw["config"], "dims": tuple(raw["config"]["dims"])})
    rows = two["checkpoints"]
    first_run = rows[0]["run_id"]
    later = [r["size"] for r in rows if r["run_id"] == first_run and r["epoch"] >= 0]
    trainable = two["trainable_bytes"]
    second = [r["size"] for r in rows if r["run_id"] != first_run]
    copies = [two["packs_holding"].get(b, 0) for b in two["backbone"]]
    epochs: dict[str, list[float]] = {}
    for r in raw["timed"]:
        epochs.setdefault(r["variant"], []).append(median(r["periods"][1:]))
    plain = median(epochs["plain"])
    overhead = {v: [(e - plain) / plain for e in xs] for v, xs in epochs.items()}
    lines = [
        "## W6: fine-tuning a head on a frozen backbone, a checkpoint every epoch (benchmarks/w6_frozen_backbone.py)",
        "",
        f"{machine()}{', SMOKE (tiny sizes)' if smoke else ''}. Backbone {two['backbone_bytes'] / 1e6:.1f} MB frozen, "
        f"trainable state (head + Adam moments) {trainable / 1e3:.1f} KB, {cfg.epochs} epochs of {cfg.batches} "
        f"batches. Median [min-max]; the machine is shared with other work, so times are noisy.",
        "",
        *table(
            "what | measured",
            [
                ["bytes written by the initial checkpoint (run 1)", f"{rows[0]['size'] / 1e6:.2f} MB"],
                [
                    "bytes written per checkpoint after the first (run 1)",
                    f"{spread(later, '{:.0f}')} B = {max(later) / trainable:.2f}x the trainable state (target ≤ 2x)",
                ],
                ["bytes written by run 2's initial checkpoint (same backbone)", f"{second[0] / 1e3:.1f} KB"],
                [
                    "packs holding each backbone tensor, after both runs",
                    f"{min(copies)}-{max(copies)} (1: stored once)",
                ],
                ["flor's checkpoint root on disk after both runs", f"{two['disk_bytes'] / 1e6:.2f} MB"],
            ],
        ),
        "",
        *table(
            "variant | epoch s after the first | overhead vs plain",
            [[v, spread(epochs[v]), spread(overhead[v], "{:+.1%}")] for v in VARIANTS],
        ),
    ]
    mc = median(overhead["modelckpt"])
    if mc > 0:
        lines += ["", f"flor's overhead / ModelCheckpoint's: {median(overhead['flor']) / mc:.2f} (medians)."]
    stats = [r["flor_stats"] for r in raw["timed"] if r["variant"] == "flor"]
    fits = [sum(r["periods"]) for r in raw["timed"] if r["variant"] == "flor"]
    own = [
        (s["snapshot_seconds"] + s["state_seconds"] + s["rng_seconds"] + s["blocked_seconds"]) / f
        for s, f in zip(stats, fits, strict=True)
    ]
    writer = [s["writer_cpu_seconds"] / f for s, f in zip(stats, fits, strict=True)]
    lines += [
        "",
        f"What flor itself spent per fit (FlorCallback.stats, {cfg.epochs + 1} checkpoints, the 33.6 MB initial one "
        f"included), as a share of the fit's epochs: training thread (state, RNG, snapshot, waiting for a write) "
        f"{spread(own, '{:.2%}')}, background writer CPU {spread(writer, '{:.2%}')}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 epochs, 1 round, to check the script runs")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--epochs", type=int, help="epochs per fit (default 6)")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file (raw results beside)")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else W6Config()
    cfg = W6Config(**{**asdict(cfg), "repeats": args.repeats or cfg.repeats, "epochs": args.epochs or cfg.epochs})
    raw = run(cfg)
    text = render(raw, args.smoke)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
