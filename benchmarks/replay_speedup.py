"""W2: time to a hindsight metric, flor replay versus retraining, side by side in one run.
How it measures: benchmarks/README.md. The parent process imports neither torch nor Lightning.

Usage: ``python benchmarks/replay_speedup.py [--smoke] [--repeats N] [--no-train-replay]
[--no-single-thread] [--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import _harness
from _harness import clock, median, spread, table, target

from flor_lightning._planner import split_segments  # not public: the split a replay makes

HERE = Path(__file__).resolve().parent
SCRIPT = "w2.py"
TARGET_FRACTION = 0.8  # measured speedup / ideal speedup
TARGET_SCALING = 0.9  # speedup of N segments over 1, per segment
QUIET = 0.1  # a run is quiet when other processes take less than this share of the CPUs


@dataclass(frozen=True)
class W2Config:
    in_dim: int = 256
    hidden: int = 1024
    classes: int = 10
    batch: int = 256
    train_batches: int = 32
    val_batches: int = 8
    epochs: int = 10
    lr: float = 1e-3
    repeats: int = 3


SMOKE = W2Config(in_dim=32, hidden=64, batch=32, train_batches=4, val_batches=1, epochs=3, repeats=1)

# The edits a user makes to get a new metric: one in validation (replay restores), one on the
# training path (replay re-trains).
VAL_EDIT = (
    '        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n',
    '        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n'
    "        top2 = logits.topk(2, dim=1).values\n"
    '        self.log("val_margin", (top2[:, 0] - top2[:, 1]).mean())\n',
)
TRAIN_EDIT = (
    '        self.log("train_loss", loss, on_step=True, on_epoch=True)\n',
    '        self.log("train_loss", loss, on_step=True, on_epoch=True)\n'
    '        self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_step=True, on_epoch=True)\n',
)


def script_text(edit: str) -> str:
    """The training script as recorded (``edit="none"``) or with a new metric (``"val"``, ``"train"``)."""
    script = (HERE / SCRIPT).read_text()
    if edit == "none":
        return script
    old, new = VAL_EDIT if edit == "val" else TRAIN_EDIT
    assert script.count(old) == 1
    return script.replace(old, new)


@dataclass(frozen=True)
class Variant:
    name: str
    group: str  # which recording: "2t" (torch's default threads) or "1t" (OMP_NUM_THREADS=1)
    edit: str
    mode: str
    devices: int
    what: str
    strategy: str = "ddp"  # with devices > 1: how Lightning starts the ranks


VARIANTS = (
    Variant("retrain", "2t", "val", "fit", 1, "plain Lightning fit from scratch"),
    Variant("replay-1", "2t", "val", "replay", 1, "replay, 1 segment"),
    Variant("replay-2", "2t", "val", "replay", 2, "replay, 2 segments on 2 DDP ranks (ddp)"),
    Variant("replay-2-fork", "2t", "val", "replay", 2, "replay, 2 segments on 2 ranks forked (ddp_fork)", "ddp_fork"),
    Variant("train-replay-1", "2t", "train", "replay", 1, "re-training replay, 1 segment"),
    Variant("train-replay-2-fork", "2t", "train", "replay", 2, "re-training replay, 2 ranks (ddp_fork)", "ddp_fork"),
    Variant("train-replay-1-1t", "1t", "train", "replay", 1, "re-training replay, 1 segment, 1 thread"),
    Variant("train-replay-2-1t-fork", "1t", "train", "replay", 2, "the same, 2 ranks x 1 thread, ddp_fork", "ddp_fork"),
)
RECORDINGS = {
    "2t": Variant("record", "2t", "none", "record", 1, "flor.Trainer fit, recording (once, before the rounds)"),
    "1t": Variant("record-1t", "1t", "none", "record", 1, "the same with OMP_NUM_THREADS=1 (once)"),
}
# What each group's speedups are measured against: a plain fit from scratch, repeated with the
# replays. The single-thread group is there for the scaling ceiling of 2 ranks on 2 cores; it is
# measured against its one recording (a flor fit), which keeps the whole run under ~8 minutes.
BASELINE = {"2t": "retrain", "1t": "record-1t"}
SCALING = (  # 1 segment, 2 segments
    ("replay-1", "replay-2"),
    ("replay-1", "replay-2-fork"),
    ("train-replay-1", "train-replay-2-fork"),
    ("train-replay-1-1t", "train-replay-2-1t-fork"),
)


# ---- running the script -------------------------------------------------------------------


class Sandbox:
    """A temporary git repository holding the training script, with its own checkpoint home."""

    def __init__(self, base: Path, group: str, cfg: W2Config) -> None:
        (gitconfig := base / "gitconfig").touch()
        drop = ("FLOR_DB", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
        self.env = (
            {k: v for k, v in os.environ.items() if k not in drop}
            | _harness.GIT_IDENTITY
            | {
                "W2_CONFIG": json.dumps(asdict(cfg)),
                "FLOR_HOME": str(base / f"flor-home-{group}"),
                "GIT_CONFIG_GLOBAL": str(gitconfig),
                "GIT_CONFIG_NOSYSTEM": "1",
                "PYTHONWARNINGS": "ignore",
                "OMP_WAIT_POLICY": "PASSIVE",  # idle OpenMP threads sleep: a waiting rank leaves its core
            }
        )
        self.env |= {"OMP_NUM_THREADS": "1"} if group == "1t" else {}
        files = {SCRIPT: script_text("none"), ".gitignore": "lightning_logs/\n"}
        self.root = _harness.git_sandbox(files, base / f"repo-{group}", env=self.env)

    def run(self, edit: str, mode: str, devices: int, strategy: str, timeout: float) -> dict[str, Any]:
        """Run the script with ``edit`` applied; its result, stamps and the parent's view of it.

        Raises:
            RunFailed: the script failed, or did not end within ``timeout`` (then it is killed).
        """
        (self.root / SCRIPT).write_text(script_text(edit))
        busy, ours = _harness.busy_seconds(), _harness.cpu_seconds(own=False)
        launch, start = time.time(), clock()
        proc = subprocess.Popen(  # a session of its own, which rank 1 joins: a hang is killed as a whole
            [sys.executable, SCRIPT, mode, str(devices), strategy], cwd=self.root, env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            reap_orphans()
            raise RunFailed(f"no result after {timeout:.0f} s; killed", stdout + stderr) from None
        wall = clock() - start
        reap_orphans()
        foreign = (_harness.busy_seconds() - busy) - (_harness.cpu_seconds(own=False) - ours)
        if proc.returncode != 0 or "W2_RESULT " not in stdout:
            raise RunFailed(f"exit code {proc.returncode}", stdout + stderr)
        result = _tagged(stdout, "W2_RESULT ")[0]
        result |= {"launch": launch, "exited": launch + wall, "wall": wall, "clocks": _tagged(stdout, "W2_CLOCK ")}
        result["others_cpu_share"] = max(0.0, foreign) / (wall * (os.cpu_count() or 1))
        return result


class RunFailed(Exception):
    def __init__(self, reason: str, output: str) -> None:
        super().__init__(reason)
        self.reason, self.output = reason, output


def become_subreaper() -> None:
    """Adopt orphaned descendants (rank 1 outliving rank 0), so their CPU time counts as ours (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    """Wait for adopted descendants that have exited (every run's processes are gone by now)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)


def _tagged(text: str, tag: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(tag) :]) for line in text.splitlines() if line.startswith(tag)]


def phases(res: dict[str, Any]) -> dict[str, float]:
    """Seconds of each phase of one run, from the wall-clock stamps (all ranks' loops pooled)."""
    loop_start = min(c["train_start"] for c in res["clocks"])
    loop_end = max(c["train_end"] for c in res["clocks"])
    out = {
        "wall": res["wall"],
        "startup": res["imported"] - res["launch"],  # process start + imports
        "call": res["call_end"] - res["call_start"],  # fit() or replay()
        "before_loop": loop_start - res["call_start"],  # setup; under DDP, rank 1's launch and the process group
        "loop": loop_end - loop_start,
        "after_loop": res["call_end"] - loop_end,  # teardown; replay: waiting for segments, comparing values
        "exit": res["exited"] - res["call_end"],
        "others": res["others_cpu_share"],  # CPU share other processes of the machine took meanwhile
    }
    if "report" in res:
        out["report"] = res["report"]["seconds"]
    return out


# ---- the recording and the ideal ----------------------------------------------------------


def recording(sandbox: Sandbox, res: dict[str, Any]) -> dict[str, Any]:
    """The recorded run's epoch timings and checkpoints, from its log store."""
    with contextlib.closing(sqlite3.connect(sandbox.root / ".flor" / "flor.db")) as conn:
        run_id, settings = conn.execute("SELECT run_id, settings FROM runs ORDER BY started DESC").fetchone()
        epochs = conn.execute(
            "SELECT epoch, ended - started - val_seconds, val_seconds FROM epochs WHERE run_id = ? ORDER BY epoch",
            [run_id],
        ).fetchall()
        ckpts = conn.execute(
            "SELECT epoch, write_seconds, size FROM checkpoints WHERE run_id = ? ORDER BY epoch", [run_id]
        ).fetchall()
    loads = {int(k): v for k, v in res["load_seconds"].items()}
    return {
        "run_id": run_id,
        "torch_threads": json.loads(settings).get("torch_threads"),
        "train": {e: t for e, t, _ in epochs},
        "val": {e: v for e, _, v in epochs},
        "write": [w for _, w, _ in ckpts],
        "size": [s for _, _, s in ckpts],
        "load": {e: loads[e] for e, _, _ in epochs if e in loads},
    }


def ideal_seconds(rec: dict[str, Any], segments: int, retrain: bool) -> float:
    """The least a replay can take: per segment, each epoch's checkpoint load and validation (plus
    its training, when re-training), from the recording; the slowest segment bounds the replay."""
    epochs = sorted(rec["train"])
    cost = {e: rec["load"].get(e, 0.0) + rec["val"][e] + (rec["train"][e] if retrain else 0.0) for e in epochs}
    return max(sum(cost[e] for e in g) for g in split_segments(epochs, segments, cost))


def ideal(num: Numbers, rec: dict[str, Any], v: Variant, phase: str = "call") -> float:
    """The ideal speedup: the baseline's measured ``phase`` over :func:`ideal_seconds`, so that
    measured / ideal = ideal seconds / the replay's measured seconds. (The recording's own
    train + validation would be the wrong numerator: it ran once, with flor's checkpoint writes
    competing for the 2 cores, while the measured speedup divides the baseline of this run.)"""
    return num.m(BASELINE[v.group], phase) / ideal_seconds(rec, v.devices, v.edit == "train")


# ---- the benchmark ------------------------------------------------------------------------


def run_rounds(
    cfg: W2Config, variants: Sequence[Variant], base: Path, *, quiet_wait: float
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Record once per group, then run every variant ``cfg.repeats`` times, interleaved.

    Before each run, wait up to 15 s (``quiet_wait`` s in all) for other processes to leave the
    CPUs. A failed or hung run is kept as a failure (with its output) and the rest goes on.
    """
    boxes = {g: Sandbox(base, g, cfg) for g in dict.fromkeys(v.group for v in variants)}
    recs: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    waited, timeout = [0.0], 600.0

    def run(v: Variant, r: int) -> dict[str, Any] | None:
        if (budget := min(15.0, quiet_wait - waited[0])) > 0:
            start = clock()
            _harness.wait_until_quiet(max_wait=budget, limit=QUIET * (os.cpu_count() or 1), window=0.5)
            waited[0] += clock() - start
        try:
            res = boxes[v.group].run(v.edit, v.mode, v.devices, v.strategy, timeout=timeout)
        except RunFailed as err:
            failures.append({"variant": v.name, "round": r, "reason": err.reason, "output": err.output[-4000:]})
            print(f"  round {r + 1}/{cfg.repeats} {v.name:17s} FAILED: {err.reason}", flush=True)
            return None
        row = {"variant": v.name, "round": r, "phases": phases(res), "report": res.get("report")}
        row["threads"] = sorted({c["threads"] for c in res["clocks"]})
        results.append(row)
        p = row["phases"]
        print(f"  round {r + 1}/{cfg.repeats} {v.name:17s} wall {p['wall']:6.2f} s, call {p['call']:6.2f} s, "
              f"loop {p['loop']:6.2f} s, other processes {p['others']:.0%} of the CPUs", flush=True)  # fmt: skip
        return res

    for g, box in boxes.items():
        res = run(RECORDINGS[g], 0)
        if res is None:
            raise RuntimeError(f"recording {g} failed:\n{failures[-1]['output']}")
        recs[g] = recording(box, res)
    # a run that takes 3x the recording's wall time (imports included) is taken to hang
    timeout = max(60.0, 3 * max(r["phases"]["wall"] for r in results))
    for r in range(cfg.repeats):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order each round
            run(v, r)
    if waited[0]:
        print(f"  waited {waited[0]:.0f} s in all for other processes to leave the CPUs", flush=True)
    return recs, results, failures


# ---- report -------------------------------------------------------------------------------


class Numbers:
    """Every run's phases, by variant name."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results, self.rows = results, {}
        for row in results:
            self.rows.setdefault(row["variant"], []).append(row)

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def xs(self, name: str, phase: str) -> list[float]:
        return [r["phases"][phase] for r in self.rows.get(name, []) if phase in r["phases"]]

    def m(self, name: str, phase: str) -> float:
        return median(self.xs(name, phase))

    def speedup(self, name: str, group: str, phase: str) -> float:
        return self.m(BASELINE[group], phase) / self.m(name, phase)

    def ratio(self, slow: str, fast: str, phase: str) -> str:
        """``slow``'s median phase over ``fast``'s, and the range of the round-by-round ratios."""
        a, b = ({r["round"]: r["phases"][phase] for r in self.rows.get(v, [])} for v in (slow, fast))
        rounds = [a[k] / b[k] for k in sorted(a.keys() & b.keys()) if b[k] > 0]
        spread = f" [{min(rounds):.2f}-{max(rounds):.2f}]" if rounds else ""
        return f"{self.m(slow, phase) / self.m(fast, phase):.2f}x{spread}"


PHASES = {
    "startup": "process start + imports",
    "before_loop": "call → first on_train_start (setup; DDP: rank 1 start-up + process group)",
    "loop": "training loop: first on_train_start → last on_train_end",
    "after_loop": "last on_train_end → call returns (replay: waiting for segments, comparing values)",
    "exit": "call returns → process exit (interpreter shutdown; DDP: rank 1's too)",
}


def run_tables(num: Numbers, recs: dict[str, dict[str, Any]], shown: Sequence[Variant]) -> list[str]:
    """The recordings, every variant's times and speedups, and each phase of a run."""
    rows = []
    for g, rec in recs.items():
        train, val = sum(rec["train"].values()), sum(rec["val"].values())
        cells = [f"{val:.2f}", f"{val / (train + val):.1%}", f"{median(rec['size']) / 1e6:.1f}", spread(rec["write"])]
        name = f"{RECORDINGS[g].name} (torch threads {rec['torch_threads']})"
        rows.append([name, len(rec["train"]), f"{train:.2f}", *cells, spread(list(rec["load"].values()))])
    recorded = table(
        "recording | epochs | training s (Σ epochs) | validation s (Σ) | validation share | checkpoint MB "
        "| write s/ckpt (background) | load s/ckpt (read + sha256 + torch.load)",
        rows,
    )
    rows = []
    for v in (v for v in shown if v.name in num):
        speed = " / ".join(f"{num.speedup(v.name, v.group, p):.2f}x" for p in ("wall", "call", "loop"))
        reports = [r["report"] for r in num.rows[v.name] if r["report"]]
        matched = ", ".join(sorted({f"{r['matched']}/{r['rederived']}" for r in reports})) or "-"
        new = ", ".join(sorted({f"{r['new_values']} ({', '.join(r['new_names'])})" for r in reports})) or "-"
        threads = ", ".join(sorted({str(t) for r in num.rows[v.name] for t in r["threads"]}))
        times = [spread(num.xs(v.name, p), "{:.2f}") for p in ("wall", "call", "report", "loop")]
        speed = "baseline" if v.name == BASELINE[v.group] else speed
        others = spread([x * 100 for x in num.xs(v.name, "others")], "{:.0f}%")
        rows.append([v.name, v.what, threads, *times, speed, matched, new, others])
    runs = table(
        "variant | what | threads/rank | subprocess wall s | fit()/replay() call s | ReplayReport.seconds "
        "| training loop s (all ranks) | speedup: wall / call / loop | recorded values re-derived: matched/all "
        "| new values | other processes' CPU share",
        rows,
    )
    names = [v.name for v in shown if v.name in num]
    phase_rows = [[label, *(f"{num.m(n, p):.2f}" for n in names)] for p, label in PHASES.items()]
    return [*recorded, "", *runs, "", *table(" | ".join(["phase, median s", *names]), phase_rows)]


def speedup_tables(num: Numbers, recs: dict[str, Any], shown: Sequence[Variant]) -> list[str]:
    """Measured speedups beside the ideal ones (call, wall, training loop), and 2 segments against 1."""
    rows: list[list[Any]] = []
    for v in (v for v in shown if v.mode == "replay" and v.name in num and BASELINE[v.group] in num):
        got = {p: num.speedup(v.name, v.group, p) for p in ("call", "wall", "loop")}
        cells = [f"{got[p]:.2f}x = {got[p] / ideal(num, recs[v.group], v, p):.0%}" for p in got]
        least = ideal_seconds(recs[v.group], v.devices, v.edit == "train")
        rows.append([v.name, f"{ideal(num, recs[v.group], v):.2f}x", *cells, f"{least:.2f}", len(num.rows[v.name])])
    scaling = [
        [f"{one} / {two}", *(f"{num.m(one, p) / num.m(two, p):.2f}x" for p in ("wall", "call", "loop"))]
        for one, two in SCALING
        if one in num and two in num
    ]
    return [
        *table(
            "variant | ideal speedup of the call: baseline call / ideal replay s | measured speedup = fraction of "
            f"ideal (target ≥ {TARGET_FRACTION:.0%}): call | wall | training loop | ideal replay s (load+val, "
            "slowest segment) | runs",
            rows,
        ),
        "",
        *table(f"1 segment / 2 segments (target ≥ {TARGET_SCALING * 2:.1f}x) | subprocess wall | call | loop", scaling),
    ]


def fixed_cost_lines(num: Numbers, shown: Sequence[Variant]) -> list[str]:
    """What every run pays besides its work, from the phases above."""

    def pooled(phase: str, keep: Any) -> list[float]:
        return [x for v in shown if keep(v) for x in num.xs(v.name, phase)]

    start, setup = pooled("startup", lambda v: v.devices == 1), pooled("before_loop", lambda v: v.devices == 1)
    lines = [f"- every process: start + imports {spread(start, '{:.2f}')} s (torch and Lightning, retrain and replay)"]
    for strategy in ("ddp", "ddp_fork"):
        if (ranks := pooled("before_loop", lambda v, s=strategy: v.strategy == s and v.devices > 1)) and setup:
            lines.append(f"- {strategy} start-up inside the replay call (ranks, process group, DDP wrap): "
                         f"{median(ranks) - median(setup):.2f} s more than a 1-device replay's setup")  # fmt: skip
    return lines


def failure_lines(failures: list[dict[str, Any]], repeats: int) -> list[str]:
    """Every failed or hung run with the end of its output: never left out of the numbers silently."""
    if not failures:
        return [f"- failed or hung runs: none (every variant ran {repeats} times)"]
    lines = [f"### Failed or hung runs: {len(failures)} (left out of the medians above)"]
    for f in failures:
        lines += ["", f"- {f['variant']}, round {f['round'] + 1}: {f['reason']}", "", "```", f["output"][-1500:], "```"]
    return lines


FLORDB_NOTE = (
    "not run as its own variant: it keeps no checkpoints inside a run, so its time to a new validation metric "
    "is at least retrain's (ANALYSIS.md)"
)


def report(cfg: W2Config, recs: dict[str, Any], num: Numbers, failures: list[dict[str, Any]]) -> str:
    shown = [RECORDINGS[g] for g in recs] + [v for v in VARIANTS if v.name in num]
    params = cfg.in_dim * cfg.hidden + cfg.hidden * cfg.hidden + cfg.hidden * cfg.classes + 2 * cfg.hidden + cfg.classes
    lines = [
        "## Replay speedup: time to a hindsight metric, flor replay vs retraining",
        "",
        f"{_harness.machine()}. OMP_WAIT_POLICY=PASSIVE.",
        "",
        f"### W2: MLP {cfg.in_dim}-{cfg.hidden}-{cfg.hidden}-{cfg.classes} ({params / 1e6:.2f}M params, Adam), "
        f"batch {cfg.batch}, {cfg.train_batches}+{cfg.val_batches} batches/epoch, {cfg.epochs} epochs; "
        f"{cfg.repeats} interleaved repeats per variant, median [min-max]. Speedups are against the group's baseline: "
        + ", ".join(f"{g} → {b}" for g, b in BASELINE.items() if g in recs)
        + "; call = the fit()/replay() call in the script; loop = on_train_start → on_train_end.",
        "",
        *run_tables(num, recs, shown),
        "",
        *speedup_tables(num, recs, shown),
        "",
        *fixed_cost_lines(num, shown),
        *failure_lines(failures, cfg.repeats),
        f"- FlorDB's replay: {_harness.missing('flordb') or FLORDB_NOTE}",
    ]
    return "\n".join(lines) + "\n"


def targets(recs: dict[str, Any], num: Numbers) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md."""
    rows = []
    for v in (v for v in VARIANTS if v.name in ("replay-1", "replay-2", "replay-2-fork") and v.name in num):
        if "retrain" in num:
            best = ideal(num, recs[v.group], v)
            part = num.speedup(v.name, v.group, "call") / best
            comparison = f"W2 {v.name} ({v.what}): speedup over retraining, fit()/replay() call (whole process: "
            measured = f"{num.ratio('retrain', v.name, 'call')} = {part:.0%} of ideal {best:.1f}x"
            ok = part >= TARGET_FRACTION
            rows.append(target(f"w2_{v.name}_ideal", comparison + f"{num.ratio('retrain', v.name, 'wall')})", measured,
                               f"≥ {TARGET_FRACTION:.0%} of ideal", ok))  # fmt: skip
    rows.append(target("w2_flordb", "W2 FlorDB's replay (flordb.replay)", _harness.missing("flordb") or FLORDB_NOTE))
    for one, two in (p for p in SCALING if p[0] in num and p[1] in num):
        comparison = f"W2 {two} vs {one}: call (training loop alone: {num.ratio(one, two, 'loop')})"
        ok = num.m(one, "call") / num.m(two, "call") >= TARGET_SCALING * 2
        rows.append(
            target(f"w2_{two}_scaling", comparison, num.ratio(one, two, "call"), f"≥ {TARGET_SCALING * 2:.1f}x", ok)
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, validation replays only")
    parser.add_argument("--repeats", type=int, help="runs per variant (default 3)")
    parser.add_argument("--no-train-replay", action="store_true", help="skip the re-training replays")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the OMP_NUM_THREADS=1 recording")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="before each run, wait up to 15 s for "
                        "other processes to leave the CPUs; at most this many seconds in all (0: never)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="markdown output (default benchmarks/results/replay_speedup.md; "
                        "none with --smoke); raw results beside it as .json")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else W2Config()
    cfg = replace(cfg, repeats=args.repeats or cfg.repeats)
    no_train, no_1t = args.no_train_replay or args.smoke, args.no_single_thread or args.smoke
    variants = [
        v for v in VARIANTS if not (v.name.startswith("train-") and no_train) and not (v.group == "1t" and no_1t)
    ]
    base = Path(tempfile.mkdtemp(prefix="flor-replay-bench-"))
    become_subreaper()
    started = clock()
    try:
        recs, results, failures = run_rounds(cfg, variants, base, quiet_wait=args.quiet_wait)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    num = Numbers(results)
    text = report(cfg, recs, num, failures)
    text += f"\n(benchmark wall time {clock() - started:.0f} s)\n"
    raw: dict[str, Any] = {"config": asdict(cfg), "recordings": recs, "runs": results, "failures": failures}
    raw |= {"targets": targets(recs, num), "wall_seconds": clock() - started}
    _harness.write_results(args.out or (None if args.smoke else HERE / "results" / "replay_speedup.md"), text, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
