"""W4: how fast ``flor.query()`` reads a big log store back, 100 runs holding 1,000,000 values.
How it measures: benchmarks/README.md.

Usage: ``python benchmarks/query_speed.py [--smoke] [--repeats N] [--out PATH]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _harness
from _harness import median, spread, table, target

import flor_lightning as flor

# not public: the store is built through flor's own writer, 1M values in seconds
from flor_lightning import _store as store

HERE = Path(__file__).resolve().parent
TARGET_SECONDS = 1.0
STEP_METRICS = ("train_loss", "train_acc", "lr", "grad_norm", "throughput")
VAL_METRICS = tuple(
    f"val_{m}" for m in ("loss", "acc", "f1", "precision", "recall", "auc", "ece", "nll", "top5", "mae")
)


@dataclass(frozen=True)
class W4Config:
    runs: int = 100
    epochs: int = 20
    steps: int = 98  # training steps per epoch
    repeats: int = 5

    @property
    def values(self) -> int:
        return self.runs * self.epochs * (self.steps * len(STEP_METRICS) + len(VAL_METRICS))


SMOKE = W4Config(runs=4, epochs=2, steps=10, repeats=1)


def run_id(i: int) -> str:
    return f"20260101-{i:06d}-bench{i % 10}"


def build_store(db: Path, cfg: W4Config) -> float:
    """Write ``cfg.runs`` finished runs and their values into a new store at ``db``; seconds taken."""
    start = time.perf_counter()
    conn = store.connect(db)
    try:
        for i in range(cfg.runs):
            store.insert(conn, "runs", _run_row(i))
    finally:
        conn.close()
    writer = store.LogWriter(lambda: store.connect(db), interval=3600)
    for i in range(cfg.runs):
        for row in _run_values(run_id(i), i, cfg):
            writer.add(row)
        writer.flush()  # one transaction per run, as a recording's writer would have many
    writer.close()
    return time.perf_counter() - start


def _run_row(i: int) -> dict[str, Any]:
    return {
        "run_id": run_id(i),
        "project": "bench",
        "script": "train.py",
        "argv": ["train.py", f"--lr={10 ** -(1 + i % 4)}"],
        "started": 1.7e9 + i * 3600,
        "ended": 1.7e9 + i * 3600 + 1800,
        "status": "finished",
        "pid": None,
        "host": "bench",
        "hparams": {"lr": 10 ** -(1 + i % 4), "batch_size": 32 * (1 + i % 3), "seed": i},
        "settings": {"max_epochs": 20},
        "versions": {},
        "shadow_commit": f"{i:040x}",
    }


def _run_values(rid: str, seed: int, cfg: W4Config) -> list[tuple[Any, ...]]:
    """One run's rows ``(run_id, replay_id, stage, level, epoch, step, batch_idx, name, value)``."""
    rows: list[tuple[Any, ...]] = []
    for epoch in range(cfg.epochs):
        for b in range(cfg.steps):
            step = epoch * cfg.steps + b
            for k, name in enumerate(STEP_METRICS):
                rows.append((rid, None, "train", "step", epoch, step, b, name, 1.0 / (step + 1 + k + seed)))
        end = (epoch + 1) * cfg.steps
        for k, name in enumerate(VAL_METRICS):
            rows.append((rid, None, "validate", "epoch", epoch, end, None, name, 0.5 + (epoch * k % 7) / 13))
    return rows


def time_query(db: str, what: str) -> dict[str, Any]:
    """In a forked child: one query, its seconds, its shape and its peak RSS over the RSS before it."""
    names, run = {"full": ((), None), "one_metric": (("val_loss",), None), "one_run": (("val_loss",), run_id(0))}[what]
    before = _harness.rss_mib("VmRSS")
    start = time.perf_counter()
    df = flor.query(*names, run=run, db=db)
    seconds = time.perf_counter() - start
    return {
        "what": what,
        "seconds": seconds,
        "rows": len(df),
        "columns": len(df.columns),
        "values": int(df[[c for c in df.columns if c in (names or (*STEP_METRICS, *VAL_METRICS))]].notna().sum().sum()),
        "mem_mib": _harness.rss_mib() - before,
    }


QUERIES = {
    "full": "flor.query() — full pivot",
    "one_metric": 'flor.query("val_loss") — one metric, every run',
    "one_run": 'flor.query("val_loss", run=...) — one metric of one run',
}


def run(cfg: W4Config, base: Path, *, quiet_wait: float) -> dict[str, Any]:
    db = base / "flor.db"
    build_seconds = build_store(db, cfg)
    small = base / "small.db"
    build_store(small, W4Config(runs=1, epochs=1, steps=2, repeats=1))
    flor.query(db=small)  # load pandas' lazily imported parts here, once, before the children fork
    results = []
    for r in range(cfg.repeats):
        for what in QUERIES:
            if quiet_wait > 0:
                _harness.wait_until_quiet(max_wait=quiet_wait)
            res = _harness.run_forked(time_query, str(db), what)
            res["repeat"] = r
            results.append(res)
            print(f"  W4 round {r + 1}/{cfg.repeats} {what:10s} {res['seconds']:.3f} s, "
                  f"+{res['mem_mib']:.0f} MiB, other load {res['other_load']:.2f} CPUs", flush=True)  # fmt: skip
    return {
        "config": asdict(cfg),
        "values": cfg.values,
        "build_seconds": build_seconds,
        "db_mb": db.stat().st_size / 1e6,
        "results": results,
    }


def targets(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md."""
    by = {w: [r for r in raw["results"] if r["what"] == w] for w in QUERIES}
    full = [r["seconds"] for r in by["full"]]
    comparison = f"W4 full pivot of {raw['values']:,} values, {raw['config']['runs']} runs (s)"
    memory = spread([r["mem_mib"] for r in by["full"]], "{:.0f}")
    return [
        target("w4_full", comparison, spread(full), f"≤ {TARGET_SECONDS:.0f} s", median(full) <= TARGET_SECONDS),
        target("w4_full_memory", "W4 full pivot, peak memory over the process's RSS before it (MiB)", memory),
        target("w4_one_metric", 'W4 `flor.query("val_loss")`, one metric of every run (s)',
               spread([r["seconds"] for r in by["one_metric"]])),
    ]  # fmt: skip


def report(raw: dict[str, Any]) -> list[str]:
    cfg = W4Config(**raw["config"])
    rows = []
    for what, label in QUERIES.items():
        rs = [r for r in raw["results"] if r["what"] == what]
        load = [r["other_load"] for r in rs]
        rows.append([label, spread([r["seconds"] for r in rs]), f"{rs[0]['rows']:,} x {rs[0]['columns']}",
                     f"{rs[0]['values']:,}", spread([r["mem_mib"] for r in rs], "{:.0f}"),
                     f"{median(load):.2f} ({max(load):.2f})"])  # fmt: skip
    header = (
        "query | seconds, median [min-max] | rows x columns | values in the frame | peak memory MiB over RSS before "
        "| other load, CPUs (max)"
    )
    lines = [
        "## Query speed: reading a log store back as a pivot",
        "",
        f"{_harness.machine()}; pandas {_harness.version('pandas')}, pyarrow {_harness.version('pyarrow')}, "
        f"adbc-driver-sqlite {_harness.version('adbc-driver-sqlite')}.",
        "",
        f"### W4: {cfg.runs} runs x {cfg.epochs} epochs x ({cfg.steps} steps x {len(STEP_METRICS)} step metrics "
        f"+ {len(VAL_METRICS)} validation metrics) = {raw['values']:,} values; store {raw['db_mb']:.0f} MB, "
        f"built through store.LogWriter in {raw['build_seconds']:.1f} s; {cfg.repeats} interleaved repeats",
        "",
        *table(header, rows),
        "",
        "- where the full pivot's time goes (cProfile): results/ANALYSIS.md",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 tiny runs, 1 repeat")
    parser.add_argument("--repeats", type=int, help="timings per query (default 5)")
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="seconds to wait before each query for "
                        "other work to leave the CPUs (0: never; smoke: 0)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="markdown output (default benchmarks/results/query_speed.md; "
                        "none with --smoke); raw results beside it as .json")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else W4Config()
    if args.repeats:
        cfg = W4Config(cfg.runs, cfg.epochs, cfg.steps, args.repeats)
    base = Path(tempfile.mkdtemp(prefix="flor-query-bench-"))
    started, busy0 = time.perf_counter(), _harness.busy_seconds()
    try:
        raw = run(cfg, base, quiet_wait=0.0 if args.smoke else args.quiet_wait)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    raw["wall_seconds"] = time.perf_counter() - started
    raw["machine_busy_cpus"] = (_harness.busy_seconds() - busy0) / raw["wall_seconds"]
    raw["targets"] = targets(raw)
    text = "\n".join([*report(raw), "", f"(benchmark wall time {raw['wall_seconds']:.0f} s)"]) + "\n"
    _harness.write_results(args.out or (None if args.smoke else HERE / "results" / "query_speed.md"), text, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
