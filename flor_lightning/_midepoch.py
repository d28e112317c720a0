"""Restarting inside an epoch: the plain-data decisions.

A restart inside epoch ``e`` after ``k`` training batches is exact when the data iterator is put
back where it was (see ``flor_lightning._lightning.fast_forward``). That needs two RNG states
recorded during the epoch: the one just before the epoch's data iterator was created (it draws
the loader's worker base seed and, lazily, the sampler's seed from the global generator) and the
one at the epoch's first ``on_train_batch_start`` (to verify the fast-forward drew exactly what
the recording drew). :class:`EpochRngTracker` keeps them; the functions here decide, from plain
facts, whether and how a restart can be exact. Nothing here imports Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Moment = Literal["validation_end", "train_batch_end"]
"""Where a mid-epoch capture is taken: ``on_validation_end`` of a validation inside the epoch, or
``on_train_batch_end`` (the two moments Lightning's own restart logic understands)."""

SkipHow = Literal["stateful", "sampler", "fetch"]


@dataclass(frozen=True)
class Exactness:
    """Whether a mid-epoch restart continues the recorded trajectory exactly.

    Attributes:
        exact: True when it does.
        reason: why not, in a sentence that says what to do (empty when exact).
        how: how the data position was restored: ``"stateful"`` (the loaders' own state),
            ``"sampler"`` (the index sampler advanced without loading data) or ``"fetch"``
            (batches fetched and discarded); empty when not exact.
        aggregates: why this epoch's aggregates (``name_epoch`` values) will not be exact although
            the trajectory is (a logged value whose aggregation state flor could not checkpoint);
            empty when they will be. The caller then stores no epoch aggregate for the epoch.
    """

    exact: bool
    reason: str = ""
    how: str = ""
    aggregates: str = ""


def not_exact(reason: str) -> Exactness:
    return Exactness(False, reason)


class EpochRngTracker:
    """Keeps the RNG states a data fast-forward into the current epoch needs, fed from hooks.

    The first epoch a fit process runs gets its data iterator before any epoch hook (Lightning
    makes it in ``setup_data``), so its "before the iterator" state is the one at ``on_fit_start``;
    a later epoch's iterator is made after the ``on_train_epoch_start`` hooks, so the state at the
    first of those hooks (a callback's, which runs before the module's) is the one. A fit that
    resumed inside an epoch carries that epoch's states over from its capture (:meth:`resumed`).

    Example:
        >>> tracker = EpochRngTracker()
        >>> tracker.fit_started({"s": 0})
        >>> tracker.epoch_started(0, {"s": 1})
        >>> tracker.batch_started(0, {"s": 2})
        >>> tracker.batch_started(0, {"s": 3})
        >>> tracker.data_rng(0)
        {'epoch': 0, 'before_iterator': {'s': 0}, 'first_batch': {'s': 2}}
    """

    def __init__(self) -> None:
        self._at_fit_start: dict[str, Any] | None = None
        self._current: dict[str, Any] | None = None

    def fit_started(self, state: dict[str, Any]) -> None:
        """At ``on_fit_start``, with ``rng.capture()``."""
        self._at_fit_start, self._current = state, None

    def epoch_started(self, epoch: int, state: dict[str, Any]) -> None:
        """At ``on_train_epoch_start`` (a callback's), with ``rng.capture()``."""
        before = self._at_fit_start if self._at_fit_start is not None else state
        self._at_fit_start = None
        self._current = {"epoch": epoch, "before_iterator": before, "first_batch": None}

    def batch_started(self, epoch: int, state: dict[str, Any]) -> None:
        """At ``on_train_batch_start``, with ``rng.capture()``; only the epoch's first is kept."""
        current = self._current
        if current is not None and current["epoch"] == epoch and current["first_batch"] is None:
            current["first_batch"] = state

    def waiting(self, epoch: int) -> bool:
        """Whether ``epoch``'s first batch state is still to come (:meth:`batch_started` keeps the next)."""
        current = self._current
        return current is not None and current["epoch"] == epoch and current["first_batch"] is None

    def resumed(self, data_rng: dict[str, Any]) -> None:
        """A fit resumed inside an epoch from a capture holding ``data_rng`` (see :meth:`data_rng`)."""
        self._at_fit_start, self._current = None, dict(data_rng)

    def data_rng(self, epoch: int) -> dict[str, Any] | None:
        """The states recorded for ``epoch``: ``{"epoch", "before_iterator", "first_batch"}``, or None
        when this epoch's have not both been seen (a capture then cannot be fast-forwarded to)."""
        current = self._current
        if current is None or current["epoch"] != epoch or current["first_batch"] is None:
            return None
        return dict(current)


@dataclass(frozen=True)
class LoaderFacts:
    """What decides how one training dataloader's position can be restored."""

    iterable_dataset: bool
    stateful: bool
    num_workers: int
    persistent_workers: bool


def data_skip(loaders: list[LoaderFacts], *, dataloader_iter: bool, sized: bool) -> SkipHow | str:
    """How to put the training data back after ``k`` batches of an epoch: a :data:`SkipHow`, or
    the reason it cannot be done exactly (a sentence).

    ``dataloader_iter``: the module's ``training_step`` takes the iterator itself; ``sized``: the
    combined training loader has a length.

    Example:
        >>> data_skip([LoaderFacts(False, False, 0, False)], dataloader_iter=False, sized=True)
        'sampler'
        >>> data_skip([LoaderFacts(False, False, 2, False)], dataloader_iter=False, sized=True)
        'fetch'
    """
    if dataloader_iter:
        return "training_step takes the dataloader iterator, so flor cannot tell which batches it consumed"
    if loaders and all(dl.stateful for dl in loaders):
        return "stateful"
    if any(dl.stateful for dl in loaders):
        return "some training loaders have state_dict/load_state_dict and some do not; give all of them one"
    if any(dl.iterable_dataset for dl in loaders):
        return (
            "the training data is an IterableDataset without state_dict/load_state_dict, so its position inside "
            "an epoch cannot be restored; make the loader stateful (e.g. torchdata's StatefulDataLoader)"
        )
    if any(dl.persistent_workers and dl.num_workers > 0 for dl in loaders):
        return (
            "the training loader keeps its worker processes across epochs (persistent_workers=True), and "
            "their random state cannot be rebuilt by a restart"
        )
    if not sized:
        return "the training loader has no length, so Lightning prefetches from it and the position is unknown"
    if len(loaders) == 1 and loaders[0].num_workers == 0:
        return "sampler"
    return "fetch"


def capture_refusal(moment: Moment, *, training_done: bool, validation_follows: bool) -> str | None:
    """Why no mid-epoch capture is taken at this moment, or None when one can be.

    ``training_done``: no training batch of this epoch follows (the epoch-end checkpoint covers
    it); ``validation_follows``: at ``on_train_batch_end``, validation runs after this batch (its
    ``on_validation_end`` is the moment to capture: Lightning's restart from a batch end would skip
    that validation).
    """
    if training_done:
        return "the epoch's training ends with this batch; the epoch-end checkpoint covers it"
    if moment == "train_batch_end" and validation_follows:
        return "validation runs after this batch; capture at its on_validation_end instead"
    return None
