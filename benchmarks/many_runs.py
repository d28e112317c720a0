"""Many past runs replayed from their own code versions: one local process, two, or a 2-worker dask cluster (issue 19).

A git sandbox holds a small Lightning script (a linear layer on 256 synthetic samples, SGD); it is recorded 8 times
with 8 learning rates (one process, one run each). Each round then replays all 8 with ``flor.replay_runs``, once per
variant, interleaved: ``parallel=1`` and ``parallel=2`` (local processes, the default executor) and ``dask`` (a
``distributed.LocalCluster`` of 2 worker processes, one thread each, through ``Client.get_executor()``; the cluster
is started once, before the rounds, and its start-up is reported on its own). Every version replay is a worktree
checkout plus a new Python process that imports torch and Lightning and restores the run's checkpoints, so most of
the time is that start-up.

Usage: ``python benchmarks/many_runs.py [--runs N] [--rounds N] [--smoke] [--out PATH]``. Benchmarks are not timed
tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _harness import GIT_IDENTITY, clock, git_sandbox, interleave, machine, median, remove, spread, table, write_results

import flor_lightning as flor

TRAIN = """
import sys
import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
import flor_lightning as flor


class Net(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)), 32)


L.seed_everything(0)
kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
trainer = flor.Trainer(max_epochs=int(sys.argv[2]), **kw)
trainer.fit(Net(float(sys.argv[1])), data(), data())
"""
VARIANTS = ("parallel=1", "parallel=2", "dask")


def record(root: Path, runs: int, epochs: int) -> list[str]:
    """Record ``runs`` runs of the sandbox's script (in this process, one after another); their ids."""
    argv = sys.argv
    try:
        for i in range(runs):
            sys.argv = ["train.py", str(0.01 * (i + 1)), str(epochs)]
            runpy.run_path(str(root / "train.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return list(flor.runs()["run_id"])


@contextmanager
def dask_cluster(workers: int) -> Iterator[tuple[Executor, float]]:
    """A LocalCluster's executor and the seconds it took to start."""
    from distributed import Client, LocalCluster

    started = clock()
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(workers)
        yield client.get_executor(), clock() - started


def replay_all(runs: list[str], parallel: int, executor: Executor | None) -> dict[str, Any]:
    started = clock()
    results = flor.replay_runs(runs=runs, propagate=False, parallel=parallel, executor=executor, echo=lambda _: None)
    seconds = clock() - started
    bad = [f"{r.run_id}: {r.status} {r.reason}" for r in results if r.status != "replayed"]
    if bad:
        raise RuntimeError(f"replays did not all succeed: {bad}")
    return {"seconds": seconds, "runs": len(results)}


def report(results: list[dict[str, Any]], runs: int, cluster_start: float) -> str:
    by = {v: [r["seconds"] for r in results if r.get("variant") == v and "seconds" in r] for v in VARIANTS}
    base = median(by["parallel=1"])
    rows = [
        [v, spread(xs, "{:.1f}"), spread([x / runs for x in xs], "{:.2f}"), f"{base / median(xs):.2f}x"]
        for v, xs in by.items()
        if xs
    ]
    rows += [[r["variant"], f"SKIPPED: {r['skipped']}", "-", "-"] for r in results if "skipped" in r]
    header = f"variant | {runs} runs replayed, s: median [min-max] | per run, s | speed-up vs parallel=1 (medians)"
    lines = [f"## Many-run replay: {runs} past runs, parallel=1 vs 2 local processes vs a 2-worker dask cluster", ""]
    lines += table(header, rows)
    lines += ["", f"dask LocalCluster start-up (once, not in the rows): {cluster_start:.1f}s. {machine()}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 runs, 1 epoch, 1 round: checks that it works")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs, rounds, epochs = (2, 1, 1) if args.smoke else (args.runs, args.rounds, args.epochs)
    tmp = Path(tempfile.mkdtemp(prefix="flor-many-runs-"))
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    try:
        os.environ.update(GIT_IDENTITY | {"FLOR_HOME": str(tmp / "flor-home")})
        os.environ.pop("FLOR_DB", None)
        root = git_sandbox({"train.py": TRAIN, ".gitignore": "__pycache__/\n"}, tmp / "proj")
        os.chdir(root)
        ids = record(root, runs, epochs)
        print(f"recorded {len(ids)} runs of {epochs} epochs; replaying them {rounds} round(s)", flush=True)
        with dask_cluster(2) as (executor, cluster_start):
            fits: dict[str, Callable[[], dict[str, Any]]] = {
                "parallel=1": lambda: replay_all(ids, 1, None),
                "parallel=2": lambda: replay_all(ids, 2, None),
                "dask": lambda: replay_all(ids, 1, executor),
            }
            results = interleave(
                VARIANTS, rounds, lambda v: fits[v]() | {"variant": v}, lambda r: f"{r['seconds']:.1f}s", {}
            )
        write_results(args.out, report(results, runs, cluster_start), {"results": results})
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        remove(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
