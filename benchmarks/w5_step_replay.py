"""W5: replay of a one-epoch run that validates every k steps, a new validation metric, restored vs retrained.

One recording (``FlorCallback()``): an MLP on random data, one epoch of ``max_steps`` steps validating every ``k``
(training dominates: a wide network, a small validation set). Then, in interleaved rounds, the same new validation
metric is replayed by ``trainer.replay(train=False)`` (each validation point restored from its checkpoint inside
the epoch) and by ``trainer.replay(train=True)`` (the epoch re-trained). The ideal speedup is
``(train + val) / (loads + val)`` from the recording's epoch row (training and validation seconds) and the measured
time of loading its checkpoints (each validation point's, and the epoch end's twice).

Each round also fits the run plainly (Lightning alone) and recorded again (`FlorCallback()`, `checkpoint_every="auto"`):
the recording overhead, with flor's own seconds from `FlorCallback.stats` beside it.

Usage: ``python benchmarks/w5_step_replay.py [--rounds N] [--smoke] [--out PATH]``. Benchmarks are not timed
tests: nothing here asserts a time. The machine is shared: figures are min-max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _harness import clock, git_sandbox, median, remove, spread, table, write_results
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor
from flor_lightning._checkpoints import CheckpointStore


class Wide(L.LightningModule):
    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class WideWithF1(Wide):
    """The hindsight metric: validation accuracy, logged only in the replays, from the logits the recorded
    validation computes anyway (the ideal counts the recorded validation time; before, a second forward pass
    doubled every replayed validation)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # one forward pass, as the recording's: the ideal counts the recorded validation time
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


def loaders(n_train: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + 64, 64, generator=g), torch.randint(0, 10, (n_train + 64,), generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=64, shuffle=True)
    return train, DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=64)


def trainer(steps: int, k: int, cls: type[L.Trainer] = flor.Trainer) -> L.Trainer:
    return cls(
        max_epochs=1,
        max_steps=steps,
        val_check_interval=k,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@contextmanager
def sandbox() -> Iterator[Path]:
    root = git_sandbox({"README": "W5 sandbox\n"})
    before, home = Path.cwd(), os.environ.get("FLOR_HOME")
    os.environ["FLOR_HOME"] = str(root / "flor-home")
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(before)
        if home is None:
            os.environ.pop("FLOR_HOME", None)
        else:
            os.environ["FLOR_HOME"] = home
        remove(root)


def recorded_times(root: Path, run_id: str) -> dict[str, float]:
    """The recording's training and validation seconds, and one load of each of its checkpoints."""
    with closing(sqlite3.connect(root / ".flor" / "flor.db")) as c:
        started, ended, val = c.execute(
            "SELECT started, ended, val_seconds FROM epochs WHERE run_id = ?", [run_id]
        ).fetchone()
        rows = c.execute(
            "SELECT path, sha256, batch_idx FROM checkpoints WHERE run_id = ? AND epoch >= 0", [run_id]
        ).fetchall()
        (ckpt_root,) = c.execute("SELECT checkpoint_root FROM runs WHERE run_id = ?", [run_id]).fetchone()
    store = CheckpointStore(ckpt_root)
    start = clock()
    for path, sha, _ in rows:
        store.load(path, sha)
    per_load = (clock() - start) / len(rows)
    loads = sum(1 for *_, b in rows if b is not None) + 2  # each validation point's, the end's twice
    return {"train": ended - started - val, "val": val, "loads": loads * per_load, "inside": len(rows) - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    steps, k, width, rounds = (12, 4, 64, 1) if args.smoke else (240, 40, 1024, args.rounds)
    fits: dict[str, list[float]] = {"plain": [], "record": []}
    flor_s: list[dict[str, float]] = []  # per recording: flor's own seconds, from FlorCallback.stats

    def fit(variant: str) -> L.Trainer:
        """One fit of the run: plain Lightning, or recorded with FlorCallback() (checkpoint_every="auto")."""
        L.seed_everything(0, workers=True)
        tr, start = trainer(steps, k, L.Trainer if variant == "plain" else flor.Trainer), clock()
        tr.fit(Wide(width), train, val)
        fits[variant].append(clock() - start)
        if variant == "record":
            st = tr.flor.stats  # type: ignore[attr-defined]
            thread = st.blocked_seconds + st.snapshot_seconds + st.state_seconds + st.rng_seconds + st.store_seconds
            flor_s.append({"thread": thread, "writer": st.writer_cpu_seconds, "checkpoints": st.checkpoints_written})
        print(f"  {variant:8s} fit {fits[variant][-1]:.2f}s", flush=True)
        return tr

    with sandbox() as root:
        train, val = loaders(steps * 64)
        run_id = fit("record").flor.run_id  # type: ignore[attr-defined]  # the recording the replays replay
        record_s = fits["record"][0]
        times = recorded_times(root, run_id)
        replay_s: dict[str, list[float]] = {"restore": [], "retrain": []}
        for r in range(rounds):
            for variant in ("restore", "retrain", "plain", "record")[:: 1 if r % 2 else -1]:
                if variant in fits:
                    fit(variant)
                    continue
                L.seed_everything(0, workers=True)
                start = clock()
                replayer = trainer(steps, k)
                report = replayer.replay(WideWithF1(width), train, val, run=run_id, train=variant == "retrain")
                replay_s[variant].append(clock() - start)
                assert report.mismatched == 0, report
                print(f"  round {r + 1}/{rounds} {variant:8s} {replay_s[variant][-1]:.2f}s", flush=True)
    ideal = (times["train"] + times["val"]) / (times["loads"] + times["val"])
    speedups = [b / a for a, b in zip(replay_s["restore"], replay_s["retrain"], strict=True)]
    overhead = [f / p - 1 for p, f in zip(fits["plain"], fits["record"][1:], strict=True)]  # round by round
    points = steps // k - (steps % k == 0)  # validation points inside the epoch (one at its end is the epoch's)
    share = {k: [f[k] / t * 100 for f, t in zip(flor_s, fits["record"], strict=True)] for k in ("thread", "writer")}
    record_row = [spread(fits["plain"], "{:.2f}"), spread(fits["record"][1:], "{:.2f}"),
                  spread([x * 100 for x in overhead], "{:+.1f}%"), spread(share["thread"], "{:.2f}%"),
                  spread(share["writer"], "{:.2f}%"), ", ".join(str(f["checkpoints"]) for f in flor_s)]  # fmt: skip
    lines = [
        f"## W5: one epoch of {steps} steps validating every {k}, a new validation metric ({rounds} rounds, "
        f"shared machine, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"recording {record_s:.2f}s: training {times['train']:.2f}s, validation {times['val']:.2f}s, "
        f"{times['inside']} checkpoints inside the epoch",
        "",
        *table(
            "variant | seconds, median [min-max] | ÷ recording",
            [[v, spread(xs, "{:.2f}"), f"{median(xs) / record_s:.2f}"] for v, xs in replay_s.items()],
        ),
        "",
        *table(
            "restore ÷ retrain speedup | ideal (train+val)/(loads+val) | share of ideal",
            [[spread(speedups, "{:.2f}"), f"{ideal:.2f}", f"{median(speedups) / ideal:.0%}"]],
        ),
        "",
        *table(
            'recording with FlorCallback() (checkpoint_every="auto") | plain fit s | recorded fit s | overhead, '
            "per round | training thread in flor, share of the fit | checkpoint writer CPU, share | checkpoints "
            f"(validation points inside the epoch: {points})",
            [record_row],
        ),
    ]
    text = "\n".join(lines) + "\n"
    raw = {"record_s": record_s, "times": times, "replay_s": replay_s, "ideal": ideal, "fits": fits, "flor": flor_s}
    write_results(args.out, text, raw)
    print(json.dumps({"speedup_median": median(speedups), "ideal": ideal}))


if __name__ == "__main__":
    main()
