"""What every benchmark shares, torch-free: timing, statistics, verdicts, markdown tables, the
machine's load from ``/proc/stat``, waiting for a quiet moment, fits in forked children (why they
are forked: benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_FORK = multiprocessing.get_context("fork")
GIT_IDENTITY = dict.fromkeys(("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"), "bench")
GIT_IDENTITY |= dict.fromkeys(("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"), "bench@localhost")
clock = time.perf_counter


# ---- statistics and markdown ---------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``median [min-max]`` of ``xs``."""
    if not xs:
        return "n/a"
    return f"{fmt.format(median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def verdict(ok: bool | None) -> str:
    """PASS or **FAIL** against a target; ``info`` where there is none (``None``)."""
    return "info" if ok is None else ("PASS" if ok else "**FAIL**")


def table(header: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table; ``header`` names its columns, ``"a | b | c"``."""
    lines = [f"| {header} |", "|" + " --- |" * (header.count("|") + 1)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def target(id: str, comparison: str, measured: str, target: str = "-", ok: bool | None = None) -> dict[str, Any]:
    """One row of RESULTS.md: ``ok`` is None where there is no target to judge (info)."""
    return {"id": id, "comparison": comparison, "measured": measured, "target": target, "ok": ok}


def write_results(out: Path | None, text: str, raw: dict[str, Any]) -> None:
    """Print the report; with ``out``, write it there and the raw results beside it as ``.json``."""
    print("\n" + text, end="", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


# ---- the machine -----------------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait; steal included), or 0."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(*, own: bool = True) -> float:
    """CPU time of this process's threads (unless not ``own``) and of its waited-for children."""
    usages = [resource.getrusage(resource.RUSAGE_CHILDREN)]
    if own:
        usages.append(resource.getrusage(resource.RUSAGE_SELF))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def wait_until_quiet(*, max_wait: float, limit: float = 0.15, window: float = 1.0) -> float:
    """Wait until the machine keeps fewer than ``limit`` CPUs busy over ``window`` seconds (at most
    ``max_wait`` seconds, for a shared machine); return the load seen last."""
    deadline = clock() + max_wait
    while True:
        busy0, start = busy_seconds(), clock()
        time.sleep(window)
        load = (busy_seconds() - busy0) / (clock() - start)
        if load < limit or clock() >= deadline:
            return load


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set size since the last reset (``VmRSS``: the current one), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    """Date, CPUs, Python and the flor_lightning commit measured."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    sha = _git("rev-parse", "--short", "HEAD") or "?"
    dirty = " (modified)" if _git("status", "--porcelain", "flor_lightning") else ""
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({model}), python {platform.python_version()}, "
        f"flor_lightning at {sha}{dirty}"
    )


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def missing(module: str) -> str | None:
    """Why the peer ``module`` cannot run here, or None."""
    if importlib.util.find_spec(module) is None:
        return f"package {module!r} is not installed (pip install -c requirements-cpu.txt -e '.[bench]')"
    return None


# ---- fits in forked children, in throwaway folders -------------------------------------------


def run_forked(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child and return its result dict (plus peak RSS, CPU time, other load)."""
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
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter, VmHWM (where the kernel allows it)
        cpu0, busy0, wall0 = cpu_seconds(), busy_seconds(), clock()
        result = fn(*args)
        cpu, busy, wall = cpu_seconds() - cpu0, busy_seconds() - busy0, clock() - wall0
        result["cpu_seconds"] = cpu  # all threads of the child and its finished children (git, for flor)
        result["peak_rss_mib"] = rss_mib()
        # CPUs kept busy by anything but this fit (other processes, the hypervisor's steal), on average.
        result["other_load"] = max(busy - cpu, 0.0) / wall
    except BaseException:
        result = {"error": traceback.format_exc()}
    send.send(result)
    send.close()


def git_sandbox(files: dict[str, str], root: Path | None = None, *, env: dict[str, str] | None = None) -> Path:
    """A git repository at ``root`` (default: a new temporary folder) holding ``files``, committed once
    with ``env`` (default: this process's); the caller removes it."""
    root = root or Path(tempfile.mkdtemp(prefix="flor-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    env = (env or dict(os.environ)) | GIT_IDENTITY
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "benchmark sandbox"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root


def interleave(
    variants: Sequence[str],
    repeats: int,
    fit: Callable[[str], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    peers: dict[str, str],
) -> list[dict[str, Any]]:
    """``fit`` each variant in turn, ``repeats`` rounds; every fit's result, with its round as ``repeat``.

    ``describe`` gives the progress line of a fit. A peer (``peers``: variant and the package it
    needs) whose package is missing, or whose fit fails, is skipped with its reason, as a row
    ``{"variant": name, "skipped": reason}``; a failing fit of any other variant raises.
    """
    skipped = {v: why for v in variants if v in peers and (why := missing(peers[v]))}
    results: list[dict[str, Any]] = []
    for r in range(repeats):
        for variant in (v for v in variants if v not in skipped):
            try:
                res = fit(variant) | {"repeat": r}
            except RuntimeError as err:
                if variant not in peers:
                    raise
                skipped[variant] = f"its fit failed: {str(err).strip().splitlines()[-1]}"
                results = [x for x in results if x["variant"] != variant]
                continue
            results.append(res)
            print(f"  round {r + 1}/{repeats} {variant:15s} {describe(res)}", flush=True)
    for variant, why in skipped.items():
        print(f"  {variant} SKIPPED: {why}", flush=True)
    return results + [{"variant": v, "skipped": why} for v, why in skipped.items()]


def remove(path: Path | str) -> None:
    shutil.rmtree(path, ignore_errors=True)
