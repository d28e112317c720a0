"""Handwritten digits (8x8, shipped with scikit-learn) classified by a small MLP, recorded by flor.

    python examples/digits.py                 # record a run
    python examples/digits.py --replay        # replay the latest run of this script

Later, add a metric nobody logged (for example in ``validation_step``:
``self.log("val_f1", f1)``) and replay: flor restores each epoch's checkpoint instead of
retraining and stores the new values beside the recorded ones.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import flor_lightning as flor


class DigitsData(L.LightningDataModule):
    """The 1,797 digits of ``sklearn.datasets.load_digits``, split 80/20 with a fixed seed."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(x))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A two-layer MLP with dropout, Adam and a step learning-rate schedule."""

    def __init__(self, hidden: int = 128, lr: float = 3e-3, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--replay", action="store_true", help="replay the latest recorded run of this script")
    args = parser.parse_args()

    L.seed_everything(0, workers=True)
    # Lightning's defaults stay on: its logger and ModelCheckpoint write lightning_logs/ here, and
    # flor leaves that folder out of the code snapshot (`flor show <run>` lists what it left out).
    trainer = flor.Trainer(max_epochs=args.epochs, deterministic=True, enable_model_summary=False)
    if args.replay:
        trainer.replay(DigitsClassifier(), datamodule=DigitsData())
    else:
        trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    # One row per (run, epoch, step); keep the epoch-end rows, where validation values sit.
    df = flor.query(run=trainer.flor.run_id, where="val_loss == val_loss")
    metrics = [c for c in df.columns[df.columns.get_loc("epoch") :] if c != "train_loss"]
    print(df[["run_id", *metrics]].to_string(index=False))


if __name__ == "__main__":
    main()
