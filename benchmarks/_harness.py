"""Shared pieces of the benchmarks: one forked child per fit, statistics, a throwaway git repo.

Each fit runs in a child forked from a parent that has imported torch and Lightning but run
no computation (so no OpenMP pool exists to be broken by the fork). The fork saves Lightning's
~7 s import per fit; the child still starts with a fresh heap, fresh threads and a peak-RSS
counter reset through ``/proc/self/clear_refs``, so its peak RSS is its own.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

_FORK = multiprocessing.get_context("fork")


def run_forked(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child and return its result dict (plus peak RSS and CPU time)."""
    recv, send = _FORK.Pipe(duplex=False)
    proc = _FORK.Process(target=_child, args=(send, fn, args))
    proc.start()
    send.close()
    try:
        result: dict[str, Any] = recv.recv()
    except EOFError:
        result = {"error": f"the benchmark child died with exit code {proc.exitcode}"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"benchmark child failed:\n{result['error']}")
    return result


def _child(send: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        reset_peak_rss()
        cpu0, busy0, wall0 = _cpu_seconds(), system_busy_seconds(), clock()
        result = fn(*args)
        cpu, busy, wall = _cpu_seconds() - cpu0, system_busy_seconds() - busy0, clock() - wall0
        result["cpu_seconds"] = cpu
        result["peak_rss_mib"] = peak_rss_mib()
        # CPUs kept busy by anything but this fit (other processes, the hypervisor's steal), on average.
        result["other_load"] = max(busy - cpu, 0.0) / wall
    except BaseException:
        result = {"error": traceback.format_exc()}
    send.send(result)
    send.close()


def _cpu_seconds() -> float:
    """CPU time of all threads of this process and of its finished children (git, for flor)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal), or 0."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS counter (VmHWM); a no-op where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process since the last reset, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def wait_until_quiet(*, limit: float = 0.15, max_wait: float = 20.0, window: float = 1.0) -> float:
    """Wait until other work keeps fewer than ``limit`` CPUs busy over ``window`` seconds (at most
    ``max_wait`` seconds, for a shared machine); return the load seen last."""
    deadline = clock() + max_wait
    while True:
        busy0, start = system_busy_seconds(), clock()
        time.sleep(window)
        load = (system_busy_seconds() - busy0) / (clock() - start)
        if load < limit or clock() >= deadline:
            return load


def git_sandbox(files: dict[str, str]) -> Path:
    """A temporary git repository holding ``files``, committed once (the caller removes it)."""
    root = Path(tempfile.mkdtemp(prefix="flor-bench-"))
    for name, text in files.items():
        (root / name).write_text(text)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "benchmark sandbox"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root


def remove(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clock() -> float:
    return time.perf_counter()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``median [min-max]`` of ``xs``."""
    if not xs:
        return "n/a"
    return f"{fmt.format(median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


class EpochTimer(Callback):
    """Timestamps of the training loop: train start/end and each epoch's start and end.

    Attach it first: callbacks run in list order (Lightning only moves ModelCheckpoint last),
    so an epoch's start timestamp is taken before any other callback's epoch-start work.
    """

    def __init__(self) -> None:
        self.train_start = self.train_end = float("nan")
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_start = clock()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(clock())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends.append(clock())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = clock()

    def periods(self) -> list[float]:
        """Seconds from each epoch's start to the next one's (the last: to the end of training)."""
        bounds = [*self.starts, self.train_end]
        return [b - a for a, b in itertools.pairwise(bounds)]


def quiet_lightning() -> None:
    """Silence Lightning's info lines and the warnings a tiny synthetic workload triggers."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13, not ours
