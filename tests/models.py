"""A small model and data module for tests that drive a real Lightning Trainer.

The data are scikit-learn's 8x8 handwritten digits (shipped with the package, no download);
the model is a tiny MLP with dropout, Adam and a StepLR schedule, so a recorded run exercises
every random number generator and every piece of state a checkpoint must carry.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

TRAIN_BATCHES = 4
VAL_BATCHES = 2
TEST_BATCHES = 2


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long)


class DigitsData(L.LightningDataModule):
    """The digits split 80/20 with a fixed permutation; the training loader shuffles."""

    def __init__(self, batch_size: int = 32, shuffle: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        x, y = _digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(x))
        self.train_set = TensorDataset(x[order[:cut]], y[order[:cut]])
        self.val_set = TensorDataset(x[order[cut:]], y[order[cut:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


class DigitsClassifier(L.LightningModule):
    """An MLP with dropout; logs train_loss (step and epoch), val_loss/val_acc and test_loss/test_acc."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2, dropout: float = 0.2) -> None:
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
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y))
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for a fast, quiet, deterministic CPU Trainer (3 epochs of 4 batches)."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 3,
        "limit_train_batches": TRAIN_BATCHES,
        "limit_val_batches": VAL_BATCHES,
        "limit_test_batches": TEST_BATCHES,
        "deterministic": True,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
    }
    kwargs.update(overrides)
    return kwargs
