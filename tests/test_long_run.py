"""A long recording: over 100,000 logged values and over 50 checkpoints, with the log writer's
backlog sampled after every batch. Nothing here is timed: the test asserts that the backlog
stays bounded and that every logged value is stored, once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import rows
from models import DigitsClassifier, DigitsData, trainer_kwargs
from torch.nn import functional as F

import flor_lightning as flor
from flor_lightning import FlorCallback

pytestmark = pytest.mark.integration

EPOCHS = 50
BATCHES = 50
NAMES = 40  # values per step; Lightning's own self.log costs ~0.5 ms a call here, so the run takes about a minute


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: with more, each of Lightning's per-call tensor moves wakes a thread pool (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ManyValues(DigitsClassifier):
    """A tiny MLP that logs NAMES values at every step, and counts them."""

    logged = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        value = loss.detach()
        for k in range(NAMES):
            self.log(f"v{k:02d}", value + k)
        type(self).logged += NAMES
        return loss


class BacklogProbe(L.Callback):
    """Reads the log writer's backlog after every batch (it is attached after FlorCallback)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []  # (epoch, backlog)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        flor_cb = next(cb for cb in trainer.callbacks if isinstance(cb, FlorCallback))  # type: ignore[attr-defined]
        self.samples.append((trainer.current_epoch, flor_cb.session.writer.backlog))


def test_long_run_keeps_the_backlog_bounded_and_stores_every_value(
    project: Path, flor_home: Path, one_thread: None
) -> None:
    ManyValues.logged = 0
    probe = BacklogProbe()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        callbacks=[FlorCallback(), probe],
        **trainer_kwargs(max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=0),
    )
    trainer.fit(ManyValues(hidden=8), datamodule=DigitsData(batch_size=16))

    per_epoch = BATCHES * NAMES
    assert ManyValues.logged == EPOCHS * per_epoch >= 100_000
    assert len(probe.samples) == EPOCHS * BATCHES
    # The writer drains the whole queue at every epoch end and at least once a second. If it kept
    # up, the backlog never exceeds what one epoch logs plus what arrives while a batch is written;
    # two epochs' worth is the cap (an unbounded queue would reach 50 epochs' worth, 25 times more).
    peak = max(b for _, b in probe.samples)
    assert peak <= 2 * per_epoch, peak
    late = max(b for e, b in probe.samples if e >= EPOCHS - 10)
    assert late <= 2 * per_epoch, late  # and it does not creep up as the run goes on

    db = project / ".flor" / "flor.db"
    (run,) = flor.runs().to_dict("records")
    assert run["status"] == "finished"
    counts = rows(db, "SELECT name, count(*) AS n FROM logs GROUP BY name ORDER BY name")
    assert counts == [{"name": f"v{k:02d}", "n": EPOCHS * BATCHES} for k in range(NAMES)]
    dup = rows(db, "SELECT count(*) AS n FROM (SELECT 1 FROM logs GROUP BY name, epoch, step HAVING count(*) > 1)")
    assert dup == [{"n": 0}]
    table = flor.query("v00", "v39")
    assert len(table) == EPOCHS * BATCHES
    assert (table["v39"] - table["v00"]).round(4).eq(39).all()

    checkpoints = rows(db, "SELECT epoch, path, size FROM checkpoints ORDER BY epoch")
    assert [c["epoch"] for c in checkpoints] == list(range(-1, EPOCHS))
    assert len(checkpoints) > 50
    assert all(Path(c["path"]).exists() for c in checkpoints)
    on_disk = sum(f.stat().st_size for f in flor_home.rglob("*") if f.is_file())
    assert sum(c["size"] for c in checkpoints) == on_disk  # each checkpoint's size: the bytes it added
