"""The training script of W2, as a user would have it: ``python w2.py record|fit|replay DEVICES STRATEGY``.

replay_speedup.py copies it into a temporary git repository (with the edit of each variant applied)
and runs it there, its configuration in ``$W2_CONFIG``; it prints its wall-clock stamps as JSON.
"""

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
        stamps = {"rank": trainer.global_rank, "train_start": self.train_start, "train_end": time.time()}
        print("W2_CLOCK " + json.dumps({**stamps, "threads": torch.get_num_threads()}), flush=True)


def measure_loads():
    """Seconds to read, verify and deserialize each checkpoint of the latest run (flor's own loader)."""
    import sqlite3  # here, not above: the other modes' import time stays what a user's script has
    from contextlib import closing

    from flor_lightning._checkpoints import CheckpointStore  # not public: flor's own loader is what is timed

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
    kw = dict(
        max_epochs=CFG["epochs"],
        accelerator="cpu",
        devices=devices,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
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
