"""What a 101 MB checkpoint costs to write and to load: today's writer vs content-addressed blobs (issue 17, phase 1).

The state is W1's (record_overhead.py): an MLP 1024-2048-2048-1024-10 (8.4M float32 parameters, 33.6 MB) and its
Adam moments (67.2 MB), after one optimizer step. Each round, interleaved (the order of the two writers alternates),
takes three checkpoints of one run, each written by both writers:

* c1: the first checkpoint, every tensor new;
* c2: after one more optimizer step, every tensor changed;
* c3: after freezing all but the last layer and one more step, only the head (and its Adam state) changed.

``today``: the writer before issue 17 (``flor_lightning._checkpoints.snapshot`` on the training thread, a clone of
every tensor, then ``write_old`` on a writer thread: ``torch.save`` into a file that hashes with SHA-256 what
passes, fsync, rename; the recorder now writes blobs, this format is only read).
``blobs``: ``ChangeTracker.snapshot`` (copies changed tensors only) and ``BlobStore.write`` on a writer thread
(xxh3-128, one safetensors pack, fsync, rename, then the manifest). Writer CPU is ``time.thread_time`` on the writer
thread; the snapshot's are the training thread's CPU and wall seconds (on a busy machine the wall time is mostly
waiting for a core). Loads (per 101 MB, c1's checkpoint): ``torch.load(...,
weights_only=True)`` of today's file (and today's ``CheckpointStore.load``, which also checks the SHA-256) vs
``BlobStore.load`` (mmap, every blob verified); cold is the first load after the write (both writers drop their files
from the page cache), warm the next one.

Usage: ``python benchmarks/blob_store.py [--rounds N] [--smoke] [--out PATH]``. Benchmarks are not timed tests:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
import torch
from _harness import busy_seconds, clock, median, remove, spread
from torch import nn

import flor_lightning._checkpoints as today
from flor_lightning._blobs import BlobStore, ChangeTracker, watch_untracked_writes

CHECKPOINTS = ("c1", "c2", "c3")
WRITERS = ("today", "blobs")


def w1(smoke: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """W1's MLP and its Adam optimizer, after one step."""
    dims = (64, 128, 128, 64, 10) if smoke else (1024, 2048, 2048, 1024, 10)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    step(net, opt, dims[0])
    return net, opt


def step(net: nn.Module, opt: torch.optim.Optimizer, in_dim: int) -> None:
    opt.zero_grad()
    net(torch.randn(32, in_dim)).pow(2).mean().backward()
    opt.step()


def state(net: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and this thread's CPU seconds."""
    wall, cpu = clock(), time.thread_time()
    out = fn()
    return out, clock() - wall, time.thread_time() - cpu


def on_thread(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` on a writer thread; its result and the thread's CPU seconds."""
    out: dict[str, Any] = {}

    def run() -> None:
        cpu = time.thread_time()
        out["result"] = fn()
        out["cpu"] = time.thread_time() - cpu

    thread = threading.Thread(target=run, name="writer")
    thread.start()
    thread.join()
    return out["result"], out["cpu"]


class Round:
    """One run's three checkpoints, written by both writers into fresh folders."""

    def __init__(self, smoke: bool, root: Path) -> None:
        self.net, self.opt = w1(smoke)
        self.in_dim = 64 if smoke else 1024
        self.today = today.CheckpointStore(str(root / "today"))
        self.blobs = BlobStore(fsspec.filesystem("file"), str(root / "blobs"))
        self.tracker = ChangeTracker(watch=watch_untracked_writes(self.net, [self.opt]))
        self.index: dict[str, str] = {}
        self.paths: dict[str, str] = {}

    def advance(self, checkpoint: str) -> None:
        if checkpoint == "c3":  # freeze the backbone: only the head trains
            for p in list(self.net.parameters())[:-2]:
                p.requires_grad_(False)
        if checkpoint != "c1":
            step(self.net, self.opt, self.in_dim)

    def write_today(self, epoch: int) -> dict[str, float]:
        snap, wall, cpu = timed(lambda: today.snapshot(state(self.net, self.opt, epoch)))
        path = f"{self.today.root}/run/epoch={epoch:05d}.ckpt"
        (_, size), writer = on_thread(lambda: today.write_old(self.today.fs, path, snap))
        self.paths.setdefault("today", path)
        return {"snapshot_cpu_s": cpu, "snapshot_s": wall, "writer_cpu_s": writer, "mb": size / 1e6}

    def write_blobs(self, epoch: int) -> dict[str, float]:
        snap, wall, cpu = timed(lambda: self.tracker.snapshot(state(self.net, self.opt, epoch)))
        name = f"run/epoch={epoch}.manifest"
        written, writer = on_thread(lambda: self.blobs.write(snap, name, index=self.index))
        self.index.update(written.new_blobs)
        self.paths.setdefault("blobs", name)
        return {"snapshot_cpu_s": cpu, "snapshot_s": wall, "writer_cpu_s": writer, "mb": written.bytes / 1e6}

    def loads(self) -> dict[str, float]:
        """Seconds to load c1's checkpoint, cold (first) and warm (second), each way."""
        path, name = self.paths["today"], self.paths["blobs"]
        ways: dict[str, Callable[[], Any]] = {
            "torch.load(weights_only=True)": lambda: torch.load(path, map_location="cpu", weights_only=True),
            "CheckpointStore.load (sha256 + torch.load)": lambda: self.today.load(path, None),
            "BlobStore.load (mmap, xxh3 verified)": lambda: self.blobs.load(name),
        }
        out: dict[str, float] = {}
        for temp in ("cold", "warm"):
            for way, load in ways.items():
                if temp == "cold":
                    drop_page_cache(path)
                    for pack in self.blobs.packs():
                        drop_page_cache(f"{self.blobs.root}/{pack}")
                loaded, wall, cpu = timed(load)
                out[f"{way}|{temp}"], out[f"{way}|{temp} cpu"] = wall, cpu
                del loaded
        return out


def drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(rounds: int, smoke: bool) -> tuple[dict[str, list[float]], float]:
    results: dict[str, list[float]] = {}
    busy0, wall0, cpu0 = busy_seconds(), clock(), time.process_time()
    for r in range(rounds):
        root = Path(tempfile.mkdtemp(prefix="flor-blob-bench-"))
        try:
            one = Round(smoke, root)
            for epoch, checkpoint in enumerate(CHECKPOINTS):
                one.advance(checkpoint)
                order = WRITERS if r % 2 == 0 else WRITERS[::-1]
                for writer in order:
                    got = one.write_today(epoch) if writer == "today" else one.write_blobs(epoch)
                    for key, value in got.items():
                        results.setdefault(f"{checkpoint}|{writer}|{key}", []).append(value)
            for key, value in one.loads().items():
                results.setdefault(f"load|{key}", []).append(value)
        finally:
            remove(root)
    other = max(busy_seconds() - busy0 - (time.process_time() - cpu0), 0.0) / (clock() - wall0)
    return results, other


def render(results: dict[str, list[float]], rounds: int, other: float, smoke: bool) -> str:
    state_mb = median(results["c1|today|mb"])
    lines = [
        "## Checkpoint storage: today's writer vs content-addressed blobs (benchmarks/blob_store.py)",
        "",
        f"{datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, {platform.python_version()}, torch {torch.__version__}"
        f"{', SMOKE (tiny state)' if smoke else ''}. State: W1's MLP + Adam, {state_mb:.1f} MB.",
        f"Median [min-max] over {rounds} interleaved rounds. Other work kept {other:.2f} CPUs busy on average "
        "during the run (the machine is shared).",
        "",
        "| checkpoint | writer | writer CPU s | training thread: snapshot CPU s | snapshot wall s | MB written |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    what = {"c1": "c1 first (all new)", "c2": "c2 one step later (all changed)", "c3": "c3 frozen backbone (head)"}
    for checkpoint in CHECKPOINTS:
        for writer in WRITERS:
            key = f"{checkpoint}|{writer}"
            lines.append(
                f"| {what[checkpoint]} | {writer} | {spread(results[f'{key}|writer_cpu_s'])} | "
                f"{spread(results[f'{key}|snapshot_cpu_s'])} | {spread(results[f'{key}|snapshot_s'])} | "
                f"{spread(results[f'{key}|mb'], '{:.2f}')} |"
            )
    lines += [
        "",
        f"| load c1 ({state_mb:.0f} MB) | cold wall s | cold CPU s | warm wall s | warm CPU s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for way in dict.fromkeys(k.split("|")[1] for k in results if k.startswith("load|")):
        cells = [spread(results[f"load|{way}|{col}"]) for col in ("cold", "cold cpu", "warm", "warm cpu")]
        lines.append(f"| {way} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--smoke", action="store_true", help="a tiny state and 2 rounds, to check the script runs")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    rounds = 2 if args.smoke else args.rounds
    results, other = run(rounds, args.smoke)
    text = render(results, rounds, other, args.smoke)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
