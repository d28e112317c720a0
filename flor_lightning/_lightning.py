"""The one module that touches private Lightning internals.

Everything here is pinned to the Lightning range in ``pyproject.toml`` and covered by the
integration tests; the rest of the package uses public Lightning API only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor

# Keys Lightning adds to a checkpoint that hold arbitrary user objects; flor keeps hyper-
# parameters in its log store instead, so a checkpoint stays loadable with weights_only=True.
_USER_OBJECT_KEYS = (
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hparams_type",
)


def dump_state(trainer: pl.Trainer) -> dict[str, Any]:
    """Lightning's full training state (model, optimizers, schedulers, precision/AMP scaler,
    loops, callbacks, datamodule), as references to the live objects."""
    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for key in _USER_OBJECT_KEYS:
        state.pop(key, None)
    return state


def epoch_values(trainer: pl.Trainer) -> dict[str, Tensor]:
    """The epoch-level aggregates of the values logged in the current stage so far.

    Names follow Lightning's loggers: ``name_epoch`` where the value was also logged per step,
    with a ``/dataloader_idx_N`` suffix for multiple evaluation dataloaders.
    """
    results = trainer._results
    if results is None:
        return {}
    out: dict[str, Tensor] = {}
    for metric in list(results.values()):
        if metric.has_reset or not metric.meta.on_epoch:
            continue
        value = _ResultCollection._get_cache(metric, on_step=False)
        if value is not None:
            _, name = results._forked_name(metric, on_step=False)
            out[name] = value
    return out
