"""Hindsight logging, end to end, on the digits example.

1. record ``digits.py`` in a fresh git repository (a throw-away copy of the example), with
   Lightning's defaults: its logger and ModelCheckpoint write ``lightning_logs/`` beside the code;
2. ``flor show`` the run: the code snapshot holds ``digits.py``, and names what it left out;
3. add a metric nobody logged (macro F1 in ``validation_step``), as a user would edit the file;
4. replay the recorded run: flor restores each epoch's checkpoint instead of retraining;
5. print ``flor.query()``: val_f1 sits on the recorded rows, beside val_loss.

    python examples/hindsight_demo.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLOR = [sys.executable, "-m", "flor_lightning"]  # the `flor` command of this interpreter

NEW_METRIC = """        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        # added after training: macro F1 over the 10 classes
        pred = nn.functional.one_hot(logits.argmax(1), 10).float()
        true = nn.functional.one_hot(y, 10).float()
        tp, fp, fn = (pred * true).sum(0), (pred * (1 - true)).sum(0), ((1 - pred) * true).sum(0)
        self.log("val_f1", (2 * tp / (2 * tp + fp + fn).clamp(min=1)).mean())"""


def run(cmd: list[str], cwd: Path) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to create the demo repository")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="flor-demo-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(HERE / "digits.py", work / "digits.py")
    git = ["git", "-c", "user.name=flor demo", "-c", "user.email=demo@localhost"]
    run([*git, "init", "-q"], work)
    run([*git, "add", "digits.py"], work)
    run([*git, "commit", "-q", "-m", "digits classifier"], work)

    print("\n== 1. record a training run", flush=True)
    run([sys.executable, "digits.py", "--epochs", "6"], work)

    print("\n== 2. the run's code snapshot: its files, and what it left out", flush=True)
    run_id = (
        subprocess.run([*FLOR, "runs", "--format", "csv"], cwd=work, check=True, capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split(",")[0]
    )
    run([*FLOR, "show", run_id], work)
    run(["git", "ls-tree", "-r", "--name-only", "flor.shadow"], work)

    print("\n== 3. add a metric nobody logged: val_f1 in validation_step", flush=True)
    script = work / "digits.py"
    text = script.read_text()
    old = '        self.log("val_acc", (logits.argmax(1) == y).float().mean())'
    script.write_text(text.replace(old, NEW_METRIC))
    subprocess.run(["git", "--no-pager", "diff", "--stat"], cwd=work, check=True)

    print("\n== 4. replay the recorded run with the new metric", flush=True)
    run([sys.executable, "digits.py", "--epochs", "6", "--replay"], work)

    print(f"\nThe demo repository is {work}; its log store is {work / '.flor' / 'flor.db'}.")


if __name__ == "__main__":
    main()
