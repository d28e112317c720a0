"""flor.Trainer: a drop-in lightning Trainer that records with FlorCallback and can replay."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from flor_lightning.callback import FlorCallback


class Trainer(pl.Trainer):
    """A :class:`lightning.pytorch.Trainer` with :class:`FlorCallback` attached.

    Takes exactly Lightning's arguments; a ``FlorCallback`` given in ``callbacks`` is used
    as it is (to set its options), otherwise a default one is added.

    Example:
        >>> import flor_lightning as flor
        >>> trainer = flor.Trainer(max_epochs=10)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if not any(isinstance(cb, FlorCallback) for cb in callbacks):
            callbacks.append(FlorCallback())
        kwargs["callbacks"] = callbacks
        super().__init__(*args, **kwargs)

    @property
    def flor(self) -> FlorCallback:
        """The attached FlorCallback."""
        return next(cb for cb in self.callbacks if isinstance(cb, FlorCallback))  # type: ignore[attr-defined]
