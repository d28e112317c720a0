"""Time to a hindsight metric: flor replay versus retraining, side by side in one run.

Workload W2: an MLP trained with Adam on synthetic data (fixed seed); training dominates each
epoch (validation ~5%); 10 epochs of ~1-2 s on this 2-core machine. The training script is
written into a temporary git repository and every variant runs it as a script in a fresh
subprocess, as a user would: Lightning's DDP launcher re-executes the script for rank 1, and
replay compares the code with the recorded shadow commit.

1. Record once with ``flor.Trainer(deterministic=True)``; right after the fit, the same process
   times flor's ``CheckpointStore.load`` (read + sha256 + ``torch.load``) on every checkpoint.
2. Add a metric and get its values; every variant runs ``--repeats`` times, interleaved:

* ``retrain``: the validation metric added, a plain ``lightning.Trainer.fit`` from scratch
  (what a user of Lightning's loggers, MLflow or W&B must do);
* ``replay-1`` / ``replay-2`` / ``replay-2-fork``: the same edit,
  ``flor.Trainer(...).replay(segments=1)`` on one device, and ``segments=2`` on 2 ranks over gloo,
  started by Lightning's ``ddp`` (rank 1 runs the script again in a new interpreter) or ``ddp_fork``
  (both ranks forked inside the call, from the process that has everything imported already);
* ``train-replay-1`` / ``train-replay-2-fork``: a metric added to ``training_step`` instead, so
  replay re-trains every epoch from the checkpoint before it;
* ``train-replay-*-1t``: the same on a second recording made with ``OMP_NUM_THREADS=1``. Replay
  gives every rank the recorded torch thread count (other counts sum floats in another order
  and would break bit-exactness), so replaying a 2-thread recording on 2 ranks runs 4 threads
  on 2 cores; 1 thread per rank shows the scaling 2 ranks can reach here.

Each run is timed from the outside (subprocess wall time) and from wall-clock stamps the
script prints: process start + imports, the ``fit()``/``replay()`` call, inside it the training
loop from the first ``on_train_start`` to the last ``on_train_end`` across ranks, and process
exit; replays also print ``ReplayReport.seconds``. Process start + imports (~7 s, Lightning),
interpreter exit (~1.5 s) and DDP start-up (rank 1 imports everything again) are fixed costs of
every run but ``ddp_fork``'s, so speedups are given on the wall time and on the in-process call.

The ideal replay time comes from the recording: checkpoint load + validation (+ training, when
re-training), summed over the epochs of the slowest segment; validation and training times from
the ``epochs`` table of ``.flor/flor.db``, load times measured. The ideal speedup is the
baseline's measured time in this run over that ideal time, so the fraction of ideal reached is
ideal replay time / measured replay time. A measured speedup reaching 80% of
it passes; 2 segments reaching 1.8x of 1 segment passes the scaling target.

``OMP_WAIT_POLICY=PASSIVE`` is set for every run (``--omp-spin`` leaves it unset): on this KVM
guest the default spinning OpenMP threads make 2-thread torch several times slower than
1 thread, which would inflate retraining and every speedup measured against it.

The parent process imports neither torch nor Lightning (nor ``_harness``, which does), so that
``--smoke`` stays well under a minute.

Usage: ``python benchmarks/replay_speedup.py [--smoke] [--repeats N] [--no-train-replay]
[--no-single-thread] [--omp-spin] [--keep] [--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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

# ---- the training script, as a user would have it -----------------------------------------

W2_SCRIPT = '''\
"""W2 of benchmarks/replay_speedup.py: python w2.py record|fit|replay DEVICES (config in $W2_CONFIG)."""

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import flor_lightning as flor  # noqa: E402

IMPORTED = time.time()
CFG = json.loads(os.environ["W2_CONFIG"])


class W2Data(L.LightningDataModule):
    """Synthetic classification: labels from a random linear teacher, fixed seed."""

    def __init__(self, in_dim, classes, batch, train_batches, val_batches):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage):
        hp = self.hparams
        g = torch.Generator().manual_seed(0)
        teacher = torch.randn(hp.in_dim, hp.classes, generator=g)

        def make(batches):
            x = torch.randn(batches * hp.batch, hp.in_dim, generator=g)
            return TensorDataset(x, (x @ teacher).argmax(dim=1))

        self.train_set, self.val_set = make(hp.train_batches), make(hp.val_batches)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.batch)


class W2Model(L.LightningModule):
    def __init__(self, in_dim, hidden, classes, lr):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Clock(L.Callback):
    """Wall-clock stamps of the training loop on this rank (printed at the end)."""

    def on_train_start(self, trainer, pl_module):
        self.train_start = time.time()

    def on_train_end(self, trainer, pl_module):
        print("W2_CLOCK " + json.dumps({"rank": trainer.global_rank, "train_start": self.train_start,
                                          "train_end": time.time(), "threads": torch.get_num_threads()}), flush=True)


def measure_loads():
    """Seconds to read, verify and deserialize each checkpoint of the latest run (flor's own loader)."""
    from contextlib import closing
    import sqlite3
    from flor_lightning.checkpoints import CheckpointStore

    with closing(sqlite3.connect(".flor/flor.db")) as conn:
        run_id, root = conn.execute("SELECT run_id, checkpoint_root FROM runs ORDER BY started DESC").fetchone()
        rows = conn.execute("SELECT epoch, path, sha256 FROM checkpoints WHERE run_id = ?", [run_id]).fetchall()
    store, out = CheckpointStore(root), {}
    for epoch, path, sha in rows:
        start = time.perf_counter()
        store.load(path, sha)
        out[epoch] = time.perf_counter() - start
    return out


def main():
    mode, devices, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    L.seed_everything(7, verbose=False)
    kw = dict(max_epochs=CFG["epochs"], accelerator="cpu", devices=devices, deterministic=True, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, callbacks=[Clock()])
    if devices > 1:
        kw["strategy"] = strategy
    model = W2Model(CFG["in_dim"], CFG["hidden"], CFG["classes"], CFG["lr"])
    data = W2Data(CFG["in_dim"], CFG["classes"], CFG["batch"], CFG["train_batches"], CFG["val_batches"])
    trainer = L.Trainer(**kw) if mode == "fit" else flor.Trainer(**kw)
    out = {"mode": mode, "started": STARTED, "imported": IMPORTED, "call_start": time.time()}
    if mode == "replay":
        out["report"] = trainer.replay(model, datamodule=data, segments=devices).__dict__
    else:
        trainer.fit(model, datamodule=data)
    out["call_end"] = time.time()
    if mode == "record":
        out["load_seconds"] = measure_loads()
    if trainer.global_rank == 0:
        print("W2_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
'''

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
    if edit == "none":
        return W2_SCRIPT
    old, new = VAL_EDIT if edit == "val" else TRAIN_EDIT
    assert W2_SCRIPT.count(old) == 1
    return W2_SCRIPT.replace(old, new)


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


# ---- running the script -------------------------------------------------------------------


class Sandbox:
    """A temporary git repository holding the training script, with its own checkpoint home."""

    def __init__(self, base: Path, group: str, cfg: W2Config, *, spin: bool) -> None:
        self.root = base / f"repo-{group}"
        self.root.mkdir(parents=True)
        gitconfig = base / "gitconfig"
        gitconfig.touch()
        drop = ("FLOR_DB", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env |= {
            "W2_CONFIG": json.dumps(asdict(cfg)),
            "FLOR_HOME": str(base / f"flor-home-{group}"),
            "GIT_CONFIG_GLOBAL": str(gitconfig),
            "GIT_CONFIG_NOSYSTEM": "1",
            "PYTHONWARNINGS": "ignore",
        }
        for role in ("AUTHOR", "COMMITTER"):
            self.env |= {f"GIT_{role}_NAME": "bench", f"GIT_{role}_EMAIL": "bench@localhost"}
        if group == "1t":
            self.env["OMP_NUM_THREADS"] = "1"
        if not spin:
            self.env["OMP_WAIT_POLICY"] = "PASSIVE"
        (self.root / SCRIPT).write_text(script_text("none"))
        (self.root / ".gitignore").write_text("lightning_logs/\n")
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "W2 training script"]):
            subprocess.run(["git", *args], cwd=self.root, env=self.env, check=True, capture_output=True)

    def run(self, edit: str, mode: str, devices: int, strategy: str, timeout: float) -> dict[str, Any]:
        """Run the script with ``edit`` applied; its result, stamps and the parent's view of it.

        Raises:
            RunFailed: the script failed, or did not end within ``timeout`` (then the native
                stacks of its processes are taken with py-spy before they are killed).
        """
        (self.root / SCRIPT).write_text(script_text(edit))
        busy, ours = cpu_busy_seconds(), children_cpu_seconds()
        launch = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, mode, str(devices), strategy],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # rank 1 joins this session: a hang is killed as a whole
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = py_spy_dumps(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            reap_orphans()
            raise RunFailed(f"no result after {timeout:.0f} s; killed", stdout + stderr, stacks) from None
        wall = time.perf_counter() - start
        reap_orphans()
        foreign = (cpu_busy_seconds() - busy) - (children_cpu_seconds() - ours)
        if proc.returncode != 0 or "W2_RESULT " not in stdout:
            raise RunFailed(f"exit code {proc.returncode}", stdout + stderr, "")
        result = _tagged(stdout, "W2_RESULT ")[0]
        result |= {"launch": launch, "exited": launch + wall, "wall": wall, "clocks": _tagged(stdout, "W2_CLOCK ")}
        result["others_cpu_share"] = max(0.0, foreign) / (wall * (os.cpu_count() or 1))
        return result


class RunFailed(Exception):
    def __init__(self, reason: str, output: str, stacks: str) -> None:
        super().__init__(reason)
        self.reason, self.output, self.stacks = reason, output, stacks


def py_spy_dumps(session: int) -> str:
    """Native and Python stacks of every process in ``session`` (py-spy beside this Python, if any)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return "(py-spy not installed: no stacks)"
    dumps = []
    for pid in session_pids(session):
        done = subprocess.run([str(spy), "dump", "--native", "--pid", str(pid)], capture_output=True, text=True)
        dumps.append(done.stdout + done.stderr)
    return "\n".join(dumps)


def session_pids(session: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session:  # after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return sorted(pids)


def cpu_busy_seconds() -> float:
    """CPU seconds all processes of the machine have run (``/proc/stat``; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


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


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, rank 1 included
    return usage.ru_utime + usage.ru_stime


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


# ---- the recording ------------------------------------------------------------------------


def recording(sandbox: Sandbox, res: dict[str, Any]) -> dict[str, Any]:
    """The recorded run's epoch timings and checkpoints, from its log store."""
    conn = sqlite3.connect(sandbox.root / ".flor" / "flor.db")
    try:
        run_id, settings = conn.execute("SELECT run_id, settings FROM runs ORDER BY started DESC").fetchone()
        epochs = conn.execute(
            "SELECT epoch, ended - started - val_seconds, val_seconds FROM epochs WHERE run_id = ? ORDER BY epoch",
            [run_id],
        ).fetchall()
        ckpts = conn.execute(
            "SELECT epoch, write_seconds, size FROM checkpoints WHERE run_id = ? ORDER BY epoch", [run_id]
        ).fetchall()
    finally:
        conn.close()
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


def split(epochs: list[int], cost: dict[int, float], n: int) -> list[list[int]]:
    """Contiguous groups of balanced cost, as flor's planner makes them (greedy on prefix sums)."""
    groups, rest = [], list(epochs)
    for k in range(n, 0, -1):
        if k == 1:
            groups.append(rest)
            break
        share, group, total = sum(cost[e] for e in rest) / k, [], 0.0
        while len(rest) > k - 1 and not (group and total + cost[rest[0]] / 2 > share):
            total += cost[rest[0]]
            group.append(rest.pop(0))
        groups.append(group)
    return groups


def ideal_seconds(rec: dict[str, Any], segments: int, retrain: bool) -> float:
    """The least a replay can take: per segment, each epoch's checkpoint load and validation (plus
    its training, when re-training), from the recording; the slowest segment bounds the replay."""
    epochs = sorted(rec["train"])
    cost = {e: rec["load"].get(e, 0.0) + rec["val"][e] + (rec["train"][e] if retrain else 0.0) for e in epochs}
    return max(sum(cost[e] for e in g) for g in split(epochs, cost, segments))


def ideal(num: Numbers, rec: dict[str, Any], v: Variant, phase: str = "call") -> float:
    """The ideal speedup: the baseline's measured ``phase`` over :func:`ideal_seconds`, so that
    measured / ideal = ideal seconds / the replay's measured seconds. (The recording's own
    train + validation would be the wrong numerator: it ran once, with flor's checkpoint writes
    competing for the 2 cores, while the measured speedup divides the baseline of this run.)"""
    return num.m(BASELINE[v.group], phase) / ideal_seconds(rec, v.devices, v.edit == "train")


# ---- the benchmark ------------------------------------------------------------------------


def run_all(
    cfg: W2Config, variants: Sequence[Variant], base: Path, *, spin: bool, quiet_wait: float
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Record once per group, then run every variant ``cfg.repeats`` times, interleaved.

    A failed or hung run is kept as a failure (with its output and stacks) and the rest goes on.
    """
    boxes = {g: Sandbox(base, g, cfg, spin=spin) for g in dict.fromkeys(v.group for v in variants)}
    recs: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    waits: list[float] = []
    timeout = 600.0

    def run(v: Variant, r: int) -> dict[str, Any] | None:
        waits.append(wait_for_quiet(min(15.0, quiet_wait - sum(waits))))
        try:
            res = boxes[v.group].run(v.edit, v.mode, v.devices, v.strategy, timeout=timeout)
        except RunFailed as err:
            failures.append({"variant": v.name, "round": r, "reason": err.reason, "output": err.output[-4000:],
                             "stacks": err.stacks})  # fmt: skip
            print(f"  round {r + 1}/{cfg.repeats} {v.name:17s} FAILED: {err.reason}", flush=True)
            return None
        row = {"variant": v.name, "round": r, "phases": phases(res), "report": res.get("report")}
        row["threads"] = sorted({c["threads"] for c in res["clocks"]})
        results.append(row)
        p = row["phases"]
        print(
            f"  round {r + 1}/{cfg.repeats} {v.name:17s} wall {p['wall']:6.2f} s, call {p['call']:6.2f} s, "
            f"loop {p['loop']:6.2f} s, other processes {p['others']:.0%} of the CPUs",
            flush=True,
        )
        return res

    for g, box in boxes.items():
        res = run(RECORDINGS[g], 0)
        if res is None:
            raise RuntimeError(f"recording {g} failed:\n{failures[-1]['output']}\n{failures[-1]['stacks']}")
        recs[g] = recording(box, res)
    # a run that takes 3x the recording's wall time (imports included) is taken to hang
    timeout = max(60.0, 3 * max(r["phases"]["wall"] for r in results))
    for r in range(cfg.repeats):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:  # rotate the order each round
            run(v, r)
    if sum(waits):
        print(f"  waited {sum(waits):.0f} s in all for other processes to leave the CPUs", flush=True)
    return recs, results, failures


def wait_for_quiet(limit: float, busy_share: float = QUIET) -> float:
    """Wait (at most ``limit`` s) until other processes use under ``busy_share`` of the CPUs; seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = cpu_busy_seconds()
        time.sleep(0.5)
        if (cpu_busy_seconds() - before) / 0.5 / (os.cpu_count() or 1) < busy_share:
            break
    return time.monotonic() - start


# ---- report -------------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median [min-max]`` of ``xs``."""
    return f"{fmt.format(med(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]" if xs else "n/a"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


class Numbers:
    """Every run's phases, by variant name."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        for row in results:
            self.rows.setdefault(row["variant"], []).append(row)

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def xs(self, name: str, phase: str) -> list[float]:
        return [r["phases"][phase] for r in self.rows.get(name, []) if phase in r["phases"]]

    def m(self, name: str, phase: str) -> float:
        return med(self.xs(name, phase))

    def speedup(self, name: str, group: str, phase: str) -> float:
        return self.m(BASELINE[group], phase) / self.m(name, phase)


def _reports(num: Numbers, name: str) -> tuple[str, str]:
    reports = [r["report"] for r in num.rows[name] if r["report"]]
    matched = ", ".join(sorted({f"{r['matched']}/{r['rederived']}" for r in reports})) or "-"
    new = ", ".join(sorted({f"{r['new_values']} ({', '.join(r['new_names'])})" for r in reports})) or "-"
    return matched, new


def main_table(num: Numbers, variants: Sequence[Variant]) -> list[str]:
    lines = [
        "| variant | what | threads/rank | subprocess wall s | fit()/replay() call s | ReplayReport.seconds "
        "| training loop s (all ranks) | speedup: wall / call / loop | recorded values re-derived: matched/all "
        "| new values | other processes' CPU share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        if v.name not in num:
            continue
        speed = " / ".join(f"{num.speedup(v.name, v.group, p):.2f}x" for p in ("wall", "call", "loop"))
        if v.name == BASELINE[v.group]:
            speed = "baseline"
        matched, new = _reports(num, v.name)
        threads = ", ".join(sorted({str(t) for r in num.rows[v.name] for t in r["threads"]}))
        lines.append(
            f"| {v.name} | {v.what} | {threads} | {spread(num.xs(v.name, 'wall'))} | {spread(num.xs(v.name, 'call'))} "
            f"| {spread(num.xs(v.name, 'report'))} | {spread(num.xs(v.name, 'loop'))} | {speed} | {matched} | {new} "
            f"| {spread([x * 100 for x in num.xs(v.name, 'others')], '{:.0f}%')} |"
        )
    return lines


PHASES = {
    "startup": "process start + imports",
    "before_loop": "call → first on_train_start (setup; DDP: rank 1 start-up + process group)",
    "loop": "training loop: first on_train_start → last on_train_end",
    "after_loop": "last on_train_end → call returns (replay: waiting for segments, comparing values)",
    "exit": "call returns → process exit (interpreter shutdown; DDP: rank 1's too)",
}


def phase_table(num: Numbers, variants: Sequence[Variant]) -> list[str]:
    names = [v.name for v in variants if v.name in num]
    lines = ["| phase, median s | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for phase, label in PHASES.items():
        lines.append(f"| {label} | " + " | ".join(f"{num.m(n, phase):.2f}" for n in names) + " |")
    return lines


def recording_table(recs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| recording | epochs | training s (Σ epochs) | validation s (Σ) | validation share | checkpoint MB "
        "| write s/ckpt (background) | load s/ckpt (read + sha256 + torch.load) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, rec in recs.items():
        train, val = sum(rec["train"].values()), sum(rec["val"].values())
        lines.append(
            f"| {RECORDINGS[g].name} (torch threads {rec['torch_threads']}) | {len(rec['train'])} | {train:.2f} "
            f"| {val:.2f} | {val / (train + val):.1%} | {med(rec['size']) / 1e6:.1f} "
            f"| {spread(rec['write'], '{:.3f}')} | {spread(list(rec['load'].values()), '{:.3f}')} |"
        )
    return lines


def ideal_table(num: Numbers, recs: dict[str, dict[str, Any]], variants: Sequence[Variant]) -> list[str]:
    lines = [
        "| variant | ideal speedup of the call: baseline call / ideal replay s | measured, call | fraction of ideal "
        "| measured, wall | fraction of ideal | measured, training loop | fraction of ideal "
        "| ideal replay s (load+val, slowest segment) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    targets = []
    for v in variants:
        if v.mode != "replay" or v.name not in num:
            continue
        least = ideal_seconds(recs[v.group], v.devices, v.edit == "train")
        best = {p: ideal(num, recs[v.group], v, p) for p in ("call", "wall", "loop")}
        got = {p: num.speedup(v.name, v.group, p) for p in best}
        part = {p: got[p] / best[p] for p in best}
        lines.append(
            f"| {v.name} | {best['call']:.2f}x | {got['call']:.2f}x | {part['call']:.0%} | {got['wall']:.2f}x "
            f"| {part['wall']:.0%} | {got['loop']:.2f}x | {part['loop']:.0%} | {least:.2f} |"
        )
        targets.append(
            f"- target: {v.name} ≥ {TARGET_FRACTION:.0%} of ideal: in-process call {part['call']:.0%} → "
            f"{verdict(part['call'] >= TARGET_FRACTION)}; subprocess wall {part['wall']:.0%} → "
            f"{verdict(part['wall'] >= TARGET_FRACTION)}"
        )
    note = (
        "- a fraction over 100% means the replay beat the estimate: the ideal's validation times are the "
        "recording's, whose validation ran beside flor's background checkpoint writes, and its load times "
        "were measured apart, after the recording; the replay's validation runs alone"
    )
    return [*lines, "", *targets, note]


SCALING = (
    ("replay-1", "replay-2"),
    ("replay-1", "replay-2-fork"),
    ("train-replay-1", "train-replay-2-fork"),
    ("train-replay-1-1t", "train-replay-2-1t-fork"),
)


def scaling_lines(num: Numbers) -> list[str]:
    lines = [
        "| 1 segment / 2 segments on 2 ranks | subprocess wall | call | training loop (all ranks) |",
        "| --- | --- | --- | --- |",
    ]
    targets = []
    want = TARGET_SCALING * 2
    for one, two in SCALING:
        if one not in num or two not in num:
            continue
        ratio = {p: num.m(one, p) / num.m(two, p) for p in ("wall", "call", "loop")}
        lines.append(f"| {one} / {two} | " + " | ".join(f"{x:.2f}x" for x in ratio.values()) + " |")
        targets.append(
            f"- target: {two} ≥ {want:.1f}x faster than {one}: "
            + "; ".join(f"{p} {x:.2f}x → {verdict(x >= want)}" for p, x in ratio.items())
        )
    return [*lines, "", *targets]


def fixed_cost_lines(num: Numbers, variants: Sequence[Variant]) -> list[str]:
    """What every run pays besides its work, from the phases above."""
    single = [x for v in variants if v.devices == 1 for x in num.xs(v.name, "startup")]
    exits = [x for v in variants if v.devices == 1 for x in num.xs(v.name, "exit")]
    ddp = [x for v in variants if v.strategy == "ddp" and v.devices > 1 for x in num.xs(v.name, "before_loop")]
    fork = [x for v in variants if v.strategy == "ddp_fork" for x in num.xs(v.name, "before_loop")]
    setup = [x for v in variants if v.devices == 1 and v.mode == "replay" for x in num.xs(v.name, "before_loop")]
    lines = [
        f"- fixed cost of every process: start + imports {spread(single)} s, exit {spread(exits)} s "
        "(torch and Lightning; the same for retraining and replay)"
    ]
    if ddp and setup:
        lines.append(
            f"- DDP start-up inside the replay call (rank 1 starts and imports everything, process group, "
            f"DDP wrap): {med(ddp) - med(setup):.2f} s more than the 1-device replay's setup ({med(setup):.2f} s); "
            "a 2-segment replay saves time only where half the replay's work exceeds it"
        )
    if fork and setup:
        lines.append(
            f"- ddp_fork start-up inside the replay call (both ranks forked, process group, DDP wrap): "
            f"{med(fork) - med(setup):.2f} s more than the 1-device replay's setup"
        )
    return lines


def quiet_lines(results: list[dict[str, Any]], recs: dict[str, Any], variants: Sequence[Variant]) -> list[str]:
    """The same speedups from quiet runs only: a view of what contention did (the targets use every run)."""
    num = Numbers([r for r in results if r["phases"]["others"] < QUIET])
    lines = [
        f"Quiet runs only (other processes under {QUIET:.0%} of the CPUs; informational, the targets above use "
        "every run):",
        "",
        "| variant | quiet runs | speedup: call / loop | fraction of ideal: call / loop "
        "| 1 → 2 segments: call / loop |",
        "| --- | --- | --- | --- | --- |",
    ]
    pairs = {two: one for one, two in SCALING}
    for v in variants:
        if v.mode != "replay":
            continue
        n = len(num.rows.get(v.name, []))
        if not n or BASELINE[v.group] not in num:
            lines.append(f"| {v.name} | {n} (baseline {BASELINE[v.group]}: {len(num.rows.get(BASELINE[v.group], []))}) "
                         "| - | - | - |")  # fmt: skip
            continue
        call, loop = num.speedup(v.name, v.group, "call"), num.speedup(v.name, v.group, "loop")
        one = pairs.get(v.name)
        scale = (
            f"{num.m(one, 'call') / num.m(v.name, 'call'):.2f}x / {num.m(one, 'loop') / num.m(v.name, 'loop'):.2f}x"
            if one in num
            else "-"
        )
        lines.append(
            f"| {v.name} | {n} | {call:.2f}x / {loop:.2f}x | {call / ideal(num, recs[v.group], v):.0%} "
            f"/ {loop / ideal(num, recs[v.group], v, 'loop'):.0%} | {scale} |"
        )
    return lines


def failure_lines(failures: list[dict[str, Any]], repeats: int) -> list[str]:
    """Every failed or hung run: never left out of the numbers silently."""
    if not failures:
        return [f"- failed or hung runs: none (every variant ran {repeats} times)"]
    lines = [f"### Failed or hung runs: {len(failures)} (left out of the medians above)"]
    for f in failures:
        lines += ["", f"- {f['variant']}, round {f['round'] + 1}: {f['reason']}", "", "```"]
        lines += (main_threads(f["stacks"]) or f["output"][-1500:]).strip().splitlines()
        lines.append("```")
    return lines


def main_threads(dumps: str) -> str:
    """Each process's header line and main-thread stack from py-spy dumps."""
    out, keep = [], False
    for line in dumps.splitlines():
        if line.startswith("Process "):
            out.append(line)
        elif line.startswith("Thread "):
            keep = "MainThread" in line
        if keep:
            out.append(line)
    return "\n".join(out)


def machine() -> str:
    cpu = platform.processor()
    for ln in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if ln.startswith("model name"):
            cpu = ln.split(":", 1)[1].strip()
            break
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "flor_lightning"], cwd=HERE.parent, capture_output=True)
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu}), python {platform.python_version()}, "
        f"flor_lightning at {sha.stdout.strip() or '?'}{' (modified)' if dirty.stdout.strip() else ''}"
    )


def report(
    cfg: W2Config,
    recs: dict[str, Any],
    results: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    load: tuple[float, float],
    *,
    spin: bool,
) -> str:
    num = Numbers(results)
    shown = [RECORDINGS[g] for g in recs] + [v for v in VARIANTS if v.name in num]
    params = cfg.in_dim * cfg.hidden + cfg.hidden * cfg.hidden + cfg.hidden * cfg.classes + 2 * cfg.hidden + cfg.classes
    lines = [
        "## Replay speedup: time to a hindsight metric, flor replay vs retraining",
        "",
        f"{machine()}. Load average (1 min) before/after: {load[0]:.2f} / {load[1]:.2f}. "
        + ("OMP_WAIT_POLICY unset (spinning OpenMP threads)." if spin else "OMP_WAIT_POLICY=PASSIVE."),
        "",
        f"### W2: MLP {cfg.in_dim}-{cfg.hidden}-{cfg.hidden}-{cfg.classes} ({params / 1e6:.2f}M params, Adam), "
        f"batch {cfg.batch}, {cfg.train_batches}+{cfg.val_batches} batches/epoch, {cfg.epochs} epochs; "
        f"{cfg.repeats} interleaved repeats per variant, median [min-max]",
        "",
        *recording_table(recs),
        "",
        "Speedups are against the group's baseline: "
        + ", ".join(f"{g} → {b}" for g, b in BASELINE.items() if g in recs)
        + ". call = the fit()/replay() call in the script; loop = on_train_start → on_train_end.",
        "",
        *main_table(num, shown),
        "",
        *phase_table(num, shown),
        "",
        *ideal_table(num, recs, shown),
        "",
        *scaling_lines(num),
        "",
        *quiet_lines(results, recs, shown),
        "",
        *fixed_cost_lines(num, shown),
        "",
        *failure_lines(failures, cfg.repeats),
        "",
        f"- FlorDB's replay: {flordb_replay_note()}",
    ]
    if load[0] > 0.5:
        lines += [
            "",
            f"- warning: the 1-minute load average was {load[0]:.2f} at the start: other processes competed "
            "for the CPUs (see their CPU share per variant); timings are inflated and noisier",
        ]
    return "\n".join(lines) + "\n"


def flordb_replay_note() -> str:
    """Why FlorDB's replay is not a variant of its own here (printed, never silently left out)."""
    from importlib.util import find_spec

    if find_spec("flordb") is None:
        return "not run: flordb is not installed (pip install -c requirements-cpu.txt -e '.[bench]')"
    return (
        "not run as its own variant: FlorDB's replay keeps no checkpoints inside a run and recomputes every "
        "iteration up to the last one asked for (flordb/api.py, 'Replay planning'), so its time to a new "
        "validation metric is at least the retrain row; and it narrows work only through `flor.loop`, which "
        "a Lightning Trainer's loop does not go through"
    )


def _per_round(results: list[dict[str, Any]], num: str, den: str, phase: str) -> list[float]:
    """``num``'s phase over ``den``'s, round by round (rounds where both ran)."""
    a = {r["round"]: r["phases"][phase] for r in results if r["variant"] == num}
    b = {r["round"]: r["phases"][phase] for r in results if r["variant"] == den}
    return [a[k] / b[k] for k in sorted(a.keys() & b.keys()) if b[k] > 0]


def _ratio(num: Numbers, results: list[dict[str, Any]], slow: str, fast: str, phase: str) -> str:
    """``slow``'s median phase over ``fast``'s, and the per-round range."""
    rounds = _per_round(results, slow, fast, phase)
    rng = f" [{min(rounds):.2f}-{max(rounds):.2f}]" if rounds else ""
    return f"{num.m(slow, phase) / num.m(fast, phase):.2f}x{rng}"


def targets(recs: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows this benchmark adds to RESULTS.md."""
    num = Numbers(results)
    rows: list[dict[str, Any]] = []
    ideal_rows = ("replay-1", "replay-2", "replay-2-fork")
    for v in (v for v in VARIANTS if v.name in ideal_rows and v.name in num and "retrain" in num):
        best = ideal(num, recs[v.group], v)
        call = num.speedup(v.name, v.group, "call")
        rows.append({
            "id": f"w2_{v.name}_ideal",
            "comparison": f"W2 {v.name} ({v.what}): speedup over retraining, fit()/replay() call "
                          f"(whole process: {_ratio(num, results, 'retrain', v.name, 'wall')})",
            "measured": f"{_ratio(num, results, 'retrain', v.name, 'call')} = {call / best:.0%} of ideal {best:.1f}x",
            "target": f"≥ {TARGET_FRACTION:.0%} of ideal",
            "ok": call / best >= TARGET_FRACTION,
        })  # fmt: skip
    rows.append({"id": "w2_flordb", "comparison": "W2 FlorDB's replay (flordb.replay)",
                 "measured": flordb_replay_note(), "target": "-", "ok": None})  # fmt: skip
    pairs = [p for p in SCALING if p[0] in num and p[1] in num]
    for one, two in pairs:
        ok = num.m(one, "call") / num.m(two, "call") >= TARGET_SCALING * 2
        rows.append({
            "id": f"w2_{two}_scaling",
            "comparison": f"W2 {two} vs {one}: call (training loop alone: {_ratio(num, results, one, two, 'loop')})",
            "measured": _ratio(num, results, one, two, "call"),
            "target": f"≥ {TARGET_SCALING * 2:.1f}x",
            "ok": ok,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, validation replays only")
    parser.add_argument("--repeats", type=int, help="runs per variant (default 3)")
    parser.add_argument("--no-train-replay", action="store_true", help="skip the re-training replays")
    parser.add_argument("--no-single-thread", action="store_true", help="skip the OMP_NUM_THREADS=1 recording")
    parser.add_argument("--omp-spin", action="store_true", help="leave OMP_WAIT_POLICY unset (see the docstring)")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="before each run, wait up to 15 s for "
                        "other processes to leave the CPUs; at most this many seconds in all (0: never)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary repositories (their path is printed)")
    parser.add_argument("--out", type=Path, help="markdown output (default benchmarks/results/replay_speedup.md; "
                        "none with --smoke); raw results beside it as .json")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else W2Config()
    cfg = replace(cfg, repeats=args.repeats or cfg.repeats)
    variants = [
        v
        for v in VARIANTS
        if not (v.name.startswith("train-") and (args.no_train_replay or args.smoke))
        and not (v.group == "1t" and (args.no_single_thread or args.smoke))
    ]
    base = Path(tempfile.mkdtemp(prefix="flor-replay-bench-"))
    become_subreaper()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        recs, results, failures = run_all(cfg, variants, base, spin=args.omp_spin, quiet_wait=args.quiet_wait)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    text = report(cfg, recs, results, failures, (load_before, os.getloadavg()[0]), spin=args.omp_spin)
    text += f"\n(benchmark wall time {time.perf_counter() - started:.0f} s)\n"
    print("\n" + text, end="")
    out = args.out or (None if args.smoke else HERE / "results" / "replay_speedup.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        raw: dict[str, Any] = {"config": asdict(cfg), "recordings": recs, "runs": results, "failures": failures}
        raw |= {"targets": targets(recs, results), "wall_seconds": time.perf_counter() - started}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
