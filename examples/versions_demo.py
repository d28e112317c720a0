"""Hindsight logging across code versions, end to end, on the digits example.

1. record three versions of ``digits.py`` in a fresh git repository: the first logs no
   ``val_acc`` yet, the second is the example as shipped, the third has a smaller network
   and a larger learning rate;
2. add macro F1 to ``validation_step`` (below ``val_acc``), as a user would edit the file;
3. ``flor.replay_runs(where="lr < 0.01")``: the two runs with the small learning rate, each
   from its own code version with the new metric merged in. The first version conflicts
   with the edit (it has no ``val_acc`` line to put F1 under) and is skipped, not guessed;
4. replay that first version with a probe callback instead, which needs no merge;
5. print the last epoch of each run.

    python examples/versions_demo.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import flor_lightning as flor

HERE = Path(__file__).resolve().parent
VAL_ACC = '        self.log("val_acc", (logits.argmax(1) == y).float().mean())\n'
NEW_METRIC = (
    VAL_ACC + "        # added after training: macro F1 over the 10 classes\n"
    "        pred = nn.functional.one_hot(logits.argmax(1), 10).float()\n"
    "        true = nn.functional.one_hot(y, 10).float()\n"
    "        tp, fp, fn = (pred * true).sum(0), (pred * (1 - true)).sum(0), ((1 - pred) * true).sum(0)\n"
    '        self.log("val_f1", (2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean())\n'
)
PROBE = '''import torch
from lightning.pytorch.callbacks import Callback


class WeightNorm(Callback):
    """The L2 norm of all parameters, after each validation."""

    def on_validation_epoch_end(self, trainer, pl_module):
        norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in pl_module.parameters()))
        pl_module.log("weight_norm", norm)
'''


def sh(cmd: list[str], cwd: Path) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def record(work: Path, text: str, message: str) -> None:
    git = ["git", "-c", "user.name=flor demo", "-c", "user.email=demo@localhost"]
    (work / "digits.py").write_text(text)
    sh([*git, "add", "digits.py"], work)
    sh([*git, "commit", "-q", "-m", message], work)
    sh([sys.executable, "digits.py", "--epochs", "4"], work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the demo repository")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="flor-versions-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shipped = (HERE / "digits.py").read_text()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    (work / ".gitignore").write_text("checkpoints/\n")  # Lightning's ModelCheckpoint output

    print("== 1. record three versions", flush=True)
    record(work, shipped.replace(VAL_ACC, ""), "v1: loss only")
    record(work, shipped, "v2: val_acc")
    small = shipped.replace("hidden: int = 128, lr: float = 3e-3", "hidden: int = 64, lr: float = 1e-2")
    record(work, small, "v3: smaller, faster")

    print("\n== 2. add val_f1 below val_acc (not committed)", flush=True)
    (work / "digits.py").write_text(small.replace(VAL_ACC, NEW_METRIC))
    (work / "probes.py").write_text(PROBE)
    os.chdir(work)
    print(flor.runs()[["run_id", "hparams"]].to_string(index=False))

    print('\n== 3. flor.replay_runs(where="lr < 0.01", parallel=2)', flush=True)
    results = flor.replay_runs(where="lr < 0.01", parallel=2)
    print(flor.format_report(results))

    print('\n== 4. that version with a probe: replay_runs(runs=[v1], probe="probes.py:WeightNorm", propagate=False)')
    skipped = [r.run_id for r in results if r.status == "skipped"]
    print(flor.format_report(flor.replay_runs(runs=skipped, probe="probes.py:WeightNorm", propagate=False)))

    print("\n== 5. the last epoch of each run", flush=True)
    df = flor.query("val_loss", "val_acc", "val_f1", "weight_norm", where="val_loss == val_loss")
    last = df.groupby("run_id").tail(1)
    print(
        last[["run_id", "lr", "hidden", "epoch", "val_loss", "val_acc", "val_f1", "weight_norm"]].to_string(index=False)
    )
    print(f"\nThe demo repository is {work}.")


if __name__ == "__main__":
    main()
