"""Every benchmark in one command, one results table: ``python benchmarks/run_all.py`` (``make bench``).

Runs record_overhead.py (W1 + W3), replay_speedup.py (W2) and query_speed.py (W4), each in its own
process, collects their target rows into ``benchmarks/results/RESULTS.md`` with the lines of the
hand-written ``results/ANALYSIS.md`` for each FAIL, and rewrites README.md between the bench markers.
``--smoke`` runs tiny sizes into a temporary folder and leaves the README alone. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import busy_seconds, cpu_seconds, table, verdict

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
ANALYSIS = HERE / "results" / "ANALYSIS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Bench:
    name: str  # the script, without .py; also the name of its .md and .json
    workloads: str
    full: tuple[str, ...]  # its arguments in a full run (sized for the 15-minute budget)


BENCHES = (
    Bench("record_overhead", "W1 + W3", ("--repeats", "3", "--epochs", "4", "--quiet-wait", "2", "--retries", "1")),
    Bench("replay_speedup", "W2", ("--repeats", "2", "--quiet-wait", "10")),
    Bench("query_speed", "W4", ("--repeats", "5", "--quiet-wait", "1")),
)


def run_bench(bench: Bench, out_dir: Path, *, smoke: bool) -> dict[str, Any]:
    """Run one benchmark script; its targets (or one FAILED row) and its wall time."""
    out = out_dir / f"{bench.name}.md"
    args = ["--smoke"] if smoke else list(bench.full)
    print(f"\n=== {bench.name} ({bench.workloads}): {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / f"{bench.name}.py"), *args, "--out", str(out)], cwd=HERE.parent)
    seconds = time.perf_counter() - start
    raw_path = out.with_suffix(".json")
    if done.returncode != 0 or not raw_path.exists():
        row = {"id": f"{bench.name}_run", "comparison": f"{bench.workloads}: {bench.name}.py",
               "measured": f"FAILED TO RUN (exit code {done.returncode})", "target": "runs", "ok": False}  # fmt: skip
        return {"bench": bench, "seconds": seconds, "targets": [row]}
    return {"bench": bench, "seconds": seconds, "targets": json.loads(raw_path.read_text()).get("targets", [])}


def where_the_time_goes(path: Path = ANALYSIS) -> dict[str, str]:
    """The hand-written line of each target id in ``path`` (its lines ``- <id>: <text>``)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return {m[1]: m[2] for line in lines if (m := re.match(r"- (w\d[\w-]*): (.+)", line))}


def explanations(runs: list[dict[str, Any]], notes: dict[str, str]) -> list[str]:
    """Where the time goes for each target that FAILs, from ``notes``, or that it has not been profiled."""
    failed = [t["id"] for run in runs for t in run["targets"] if t["ok"] is False]
    lines = [f"- {i}: {notes.get(i, 'not yet profiled')}" for i in failed]
    return ["Where the time goes, for each FAIL:", "", *lines] if lines else []


def results_text(runs: list[dict[str, Any]], meta: dict[str, Any], link_dir: str) -> str:
    mode = "smoke mode (tiny sizes, timings meaningless)" if meta["smoke"] else "full run"
    rows = []
    for run in runs:
        link = f"[{run['bench'].name}.md]({link_dir}{run['bench'].name}.md)"
        rows += [[t["comparison"], t["measured"], t["target"], verdict(t["ok"]), link] for t in run["targets"]]
    wall, other_load = meta["wall"], meta["other_load"]
    lines = [
        "## Benchmark results",
        "",
        f"`python benchmarks/run_all.py` ({mode}), {meta['date']}, {os.cpu_count()} CPUs: "
        f"{wall / 60:.1f} min in all ("
        + ", ".join(f"{r['bench'].name} {r['seconds']:.0f} s" for r in runs)
        + f"). Other work kept {other_load:.2f} CPUs busy on average meanwhile (from /proc/stat); "
        "each detailed file gives the other load per fit. Ratios are measured interleaved in the same run.",
        "",
        *table("comparison / target | measured: median [min-max] | target | verdict | details", rows),
        "",
        *explanations(runs, where_the_time_goes()),
    ]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(text: str, readme: Path = README) -> bool:
    """Replace what lies between the bench markers of ``readme``; False where they are missing."""
    current = readme.read_text()
    if BEGIN not in current or END not in current:
        return False
    head, rest = current.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, into a temporary folder; README untouched")
    parser.add_argument("--out-dir", type=Path, help="where the .md/.json files go (default benchmarks/results)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[b.name for b in BENCHES],
        help="run only these benchmarks (their "
        "detailed files are rewritten; RESULTS.md and the README keep the last full run)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="flor-bench-smoke-")) if args.smoke else HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    benches = [b for b in BENCHES if not args.only or b.name in args.only]
    start, busy0, cpu0 = time.perf_counter(), busy_seconds(), cpu_seconds(own=False)
    runs = [run_bench(b, out_dir, smoke=args.smoke) for b in benches]
    wall = time.perf_counter() - start
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "smoke": args.smoke,
        "wall": wall,
        "other_load": max(0.0, (busy_seconds() - busy0) - (cpu_seconds(own=False) - cpu0)) / wall,
        "seconds": {r["bench"].name: r["seconds"] for r in runs},
    }
    text = results_text(runs, meta, "")
    print("\n" + text, end="", flush=True)
    whole = not args.only or out_dir != HERE / "results"
    if not whole:  # a partial run leaves the summary of the last full run whole (its detailed files are new)
        print(f"\n--only: {out_dir / 'RESULTS.md'} and the README keep the last full run; rerun without --only")
        return 0
    (out_dir / "run_all.json").write_text(json.dumps(meta, indent=1))
    (out_dir / "RESULTS.md").write_text(text)
    if not meta["smoke"] and not args.only and out_dir == HERE / "results":
        readme_text = results_text(runs, meta, "benchmarks/results/")
        if not update_readme(readme_text.split("\n", 2)[2]):  # without its own heading
            print(f"README.md has no {BEGIN} ... {END} markers: not updated", flush=True)
    print(f"\nresults in {out_dir / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
