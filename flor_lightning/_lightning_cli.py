"""LightningCLI with a ``replay`` subcommand beside ``fit``, ``validate``, ``test`` and ``predict``.

Needs jsonargparse, as Lightning's own CLI does (``pip install "lightning[pytorch-extra]"`` or
``pip install "flor_lightning[cli]"``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI as _LightningCLI
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

from flor_lightning._errors import ConfigError
from flor_lightning._trainer import Trainer

_REPLAY_SKIPS = {"model", "datamodule", "train_dataloaders", "val_dataloaders"}


class LightningCLI(_LightningCLI):
    """Lightning's ``LightningCLI`` recording with :class:`flor_lightning.Trainer`, plus ``replay``.

    Takes LightningCLI's arguments (all but the model and datamodule classes by keyword);
    ``trainer_class`` defaults to ``flor.Trainer`` (a subclass of it may be given).
    ``replay`` takes the same configuration as ``fit`` and the options of
    :meth:`flor_lightning.Trainer.replay` (``--run``, ``--epochs``, ``--segments``,
    ``--segment``, ``--train``, ``--loggers``). It writes no ``config.yaml``: that belongs to the recorded run.

    Example::

        # train.py
        import flor_lightning as flor
        flor.LightningCLI(MyModel, MyData)        # was: LightningCLI(MyModel, MyData)

        python train.py fit --config cfg.yaml     # records
        python train.py replay --config cfg.yaml  # replays the latest recorded run of train.py
        python train.py replay --config cfg.yaml --run <id> --segments 2
    """

    def __init__(
        self,
        model_class: Any = None,
        datamodule_class: Any = None,
        *,
        trainer_class: type[Trainer] = Trainer,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
            raise ConfigError(
                f"trainer_class must be flor_lightning.Trainer or a subclass of it (it records and replays), "
                f"got {trainer_class!r}"
            )
        super().__init__(model_class, datamodule_class, trainer_class=trainer_class, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**_LightningCLI.subcommands(), "replay": set(_REPLAY_SKIPS)}

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "replay":
            # the recording already saved its config; saving again would refuse to overwrite it
            kept = [cb for cb in trainer.callbacks if not isinstance(cb, SaveConfigCallback)]  # type: ignore[attr-defined]
            trainer.callbacks = kept  # type: ignore[attr-defined]
        return trainer
