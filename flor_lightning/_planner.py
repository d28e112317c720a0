"""Replay planning: pure decisions over plain data (no Trainer, no disk, no git).

Checkpoint ``e`` holds the state once epoch ``e`` is entirely done; checkpoint ``-1`` holds
the state before the first epoch. An epoch is *restored* by loading its own checkpoint and
running validation and the epoch-end hooks; it is *trained* by loading the checkpoint of the
epoch before it (or training forward from an earlier one) and running its batches again.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from flor_lightning._errors import ReplayError


@dataclass(frozen=True)
class EpochStep:
    """One epoch of a replay.

    Attributes:
        epoch: the recorded epoch number this step reproduces.
        action: ``"restore"`` (load the epoch's checkpoint, validate, run epoch-end hooks) or
            ``"train"`` (run the epoch's training batches again).
        load: the checkpoint to load before the step (``-1`` is the initial state), or None to
            continue from the state the previous step left.
        wanted: False for an epoch trained only to reach a wanted one (no checkpoint in between).
        inside: for a restore of an epoch that validated inside: the batch indices of its checkpoints at
            those validation points, each restored and validated in order before the epoch's end.
        validate_end: for such an epoch, whether it validated at its end too (None: as
            ``check_val_every_n_epoch`` says).
        start_inside: for a train step: the batch index of the checkpoint inside ``epoch`` it starts from
            (``load`` is None then), continuing the epoch after that batch.
        stop_after: for a train step: stop the epoch once this many of its batches are done (and their
            validation, if due), without the epoch's end.
        keep: store only the values logged at global steps ``keep[0] <= step < keep[1]`` (None: all).
        end: for a restore: False for a segment of the epoch that validates only its points inside and
            leaves the epoch's end (its last validation, epoch-end hooks) to a later segment.
    """

    epoch: int
    action: Literal["restore", "train"]
    load: int | None
    wanted: bool = True
    inside: tuple[int, ...] = ()
    validate_end: bool | None = None
    start_inside: int | None = None
    stop_after: int | None = None
    keep: tuple[int, int] | None = None
    end: bool = True


InsidePoint = tuple[int, int, str]
"""A checkpoint inside an epoch: its global step, the batch index it was taken after, its moment
(``"validation_end"`` or ``"train_batch_end"``)."""


Points = dict[int, tuple[tuple[int, ...], bool]]
"""Per epoch, the batch indices of its checkpoints at validation points inside it, and whether it validated
at its end (:func:`validation_points`)."""


def validation_points(
    epochs: Sequence[int],
    *,
    validated_at: Mapping[int, Collection[int]],
    end_steps: Mapping[int, int],
    inside: Mapping[int, Mapping[int, int]],
) -> Points | str:
    """Where each of ``epochs`` validated, as a restore replays it; or why it cannot (a sentence).

    Args:
        validated_at: per epoch, the global steps the recording validated at (its validation values).
        end_steps: per epoch, the global step of its checkpoint at its end.
        inside: per epoch, ``{global step: batch index}`` of its checkpoints taken as a validation ended.

    Example:
        >>> validation_points([0], validated_at={0: [3, 6, 9, 12]}, end_steps={0: 12}, inside={0: {3: 2, 6: 5, 9: 8}})
        {0: ((2, 5, 8), True)}
        >>> validation_points([0], validated_at={0: [3, 6]}, end_steps={0: 8}, inside={0: {3: 2}})
        'epoch 0 validated at step 6, where it has no checkpoint'
    """
    if not any(validated_at.get(e) for e in epochs):
        return "the run logged no validation value, so its validation points are unknown"
    points: Points = {}
    for e in epochs:
        batches: list[int] = []
        at_end = False
        for step in sorted(set(validated_at.get(e, ()))):
            if step in inside.get(e, {}):
                batches.append(inside[e][step])
            elif step == end_steps.get(e):
                at_end = True
            else:
                return f"epoch {e} validated at step {step}, where it has no checkpoint"
        points[e] = (tuple(batches), at_end)
    return points


def with_points(steps: Iterable[EpochStep], points: Points | None) -> list[EpochStep]:
    """``steps`` with each restore told where its epoch validated (``points``; None: unchanged)."""
    if points is None:
        return list(steps)
    return [
        replace(s, inside=points[s.epoch][0], validate_end=points[s.epoch][1])
        if s.action == "restore" and s.epoch in points
        else s
        for s in steps
    ]


@dataclass(frozen=True)
class Segment:
    """A contiguous slice of the replayed epochs, run by one process or rank."""

    index: int
    steps: tuple[EpochStep, ...]

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(s.epoch for s in self.steps if s.wanted)


def epoch_list(epochs: Sequence[int] | range | None, recorded: Sequence[int]) -> list[int]:
    """The sorted epochs to replay; all recorded ones when ``epochs`` is None.

    Raises:
        ReplayError: an epoch was not recorded (the message names the recorded range).
    """
    have = sorted(set(recorded))
    if not have:
        raise ReplayError("the run has no completed epoch to replay")
    if epochs is None:
        return have
    wanted = sorted(set(int(e) for e in epochs))
    missing = [e for e in wanted if e not in set(have)]
    if missing or not wanted:
        raise ReplayError(
            f"epochs {missing or '(none)'} were not recorded; recorded epochs: {describe(have)}. "
            f"Choose epochs within {describe(have)}."
        )
    return wanted


def describe(epochs: Sequence[int]) -> str:
    """``0-5`` for a contiguous list, ``""`` for an empty one, else the list itself."""
    if not epochs:
        return ""
    if epochs and list(epochs) == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else str(epochs[0])
    return str(list(epochs))


def split_segments(epochs: Sequence[int], segments: int, cost: Mapping[int, float]) -> list[list[int]]:
    """Split ``epochs`` into ``segments`` contiguous, non-empty groups of balanced total cost.

    Greedy by prefix sums: a group closes once it reaches its share of the remaining cost,
    while leaving at least one epoch for every later group.
    """
    if not 1 <= segments <= len(epochs):
        raise ReplayError(
            f"segments must be between 1 and the number of epochs replayed ({len(epochs)}), got {segments}"
        )
    groups: list[list[int]] = []
    rest = list(epochs)
    for k in range(segments, 0, -1):
        if k == 1:
            groups.append(rest)
            break
        share = sum(cost.get(e, 1.0) for e in rest) / k
        group: list[int] = []
        total = 0.0
        while rest and len(rest) > k - 1:
            c = cost.get(rest[0], 1.0)
            if group and total + c / 2 > share:
                break
            group.append(rest.pop(0))
            total += c
        groups.append(group)
    return groups


def steps_for(
    epochs: Sequence[int], checkpoints: Collection[int], *, train: bool, scratch: bool = False
) -> list[EpochStep]:
    """The steps that reproduce ``epochs`` (ascending) from the available ``checkpoints``.

    An epoch with no checkpoint at or before the one it needs is trained forward from the state the
    previous step left, or, with ``scratch``, from the start: from the model as it was passed in, which
    stands for the initial state (every checkpoint was freed, lost or never kept).

    Raises:
        ReplayError: an epoch has no checkpoint at or before the one it needs and there is nothing to
            train forward from.
    """
    have = set(checkpoints)
    steps: list[EpochStep] = []
    state: int | None = None  # the epoch whose end state the model holds now
    for e in epochs:
        if not train and e in have:
            steps.append(EpochStep(e, "restore", e))
            state = e
            continue
        if state == e - 1:
            steps.append(EpochStep(e, "train", e - 1 if e - 1 in have else None))
        elif e - 1 in have:
            steps.append(EpochStep(e, "train", e - 1))
        else:
            earlier = [c for c in have if c < e]
            if earlier:
                start = max(earlier)
                steps.append(EpochStep(start + 1, "train", start, wanted=start + 1 == e))
                steps += [EpochStep(b, "train", None, wanted=b == e) for b in range(start + 2, e + 1)]
            elif state is not None or scratch:
                begin = -1 if state is None else state  # the model as passed in, or the state the last step left
                steps += [EpochStep(b, "train", None, wanted=b == e) for b in range(begin + 1, e + 1)]
            else:
                raise ReplayError(
                    f"no usable checkpoint at or before epoch {e - 1} to start epoch {e} from (checkpoints exist "
                    f"for epochs {describe(sorted(have)) or '(none)'}), and this replay cannot train from the start "
                    "there. Replay with segments=1 in a new process (it re-trains from the model you pass), or "
                    "record again."
                )
        state = e
    return steps


def plan_segments(
    epochs: Sequence[int],
    checkpoints: Collection[int],
    *,
    train: bool,
    segments: int,
    cost: Mapping[int, float],
    scratch: bool = False,
    points: Points | None = None,
) -> list[Segment]:
    """Split the replay of ``epochs`` into ``segments`` segments, each with its own starting checkpoint
    (``scratch``: each segment starts with the model as passed in, so it may train from the start;
    ``points``: where the epochs validated inside, see :func:`validation_points`)."""
    return [
        Segment(i, tuple(with_points(steps_for(group, checkpoints, train=train, scratch=scratch), points)))
        for i, group in enumerate(split_segments(epochs, segments, cost))
    ]


def validate_epochs(epochs: object) -> None:
    """Check ``epochs`` as given to ``replay``: None, or a list, range (any collection) of whole epoch numbers.

    Raises:
        ReplayError: anything else (a lone number, a string, floats, bools), with what to pass instead.
    """
    if epochs is None or isinstance(epochs, range):
        return
    example = "e.g. epochs=[5] for epoch 5, or epochs=range(5) for epochs 0-4"
    if not isinstance(epochs, Iterable) or isinstance(epochs, (str, bytes, Mapping)):
        raise ReplayError(f"epochs must be a list or range of recorded epoch numbers ({example}); got {epochs!r}")
    odd = [e for e in epochs if isinstance(e, bool) or not isinstance(e, numbers.Integral)]
    if odd:
        raise ReplayError(f"epochs must be whole epoch numbers ({example}); got {odd!r} in {epochs!r}")


def validate_segment_args(segments: object, segment: object) -> None:
    """Check ``segments``/``segment`` as given to ``replay`` (before anything runs)."""
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise ReplayError(f"segments must be a whole number >= 1, got {segments!r}")
    if segment is not None and (
        not isinstance(segment, int) or isinstance(segment, bool) or not 0 <= segment < segments
    ):
        raise ReplayError(f"segment must be a whole number in 0..{segments - 1} (segments={segments}), got {segment!r}")


def estimate_seconds(
    steps: Sequence[EpochStep],
    train_s: Mapping[int, float],
    val_s: Mapping[int, float],
    load_s: float,
    batches: int | None = None,
) -> float:
    """Expected replay time from the recorded epoch timings (a restore with validation points inside its
    epoch loads each one's checkpoint, then its own again; a train step that starts or stops inside its epoch
    of ``batches`` batches takes its share of the epoch's time)."""
    total = 0.0
    for s in steps:
        loads = (s.load is not None or s.start_inside is not None) + (len(s.inside) + 1 if s.inside else 0)
        share = 1.0
        if s.action == "train" and batches:
            begin = 0 if s.start_inside is None else s.start_inside + 1
            share = min(max(((s.stop_after or batches) - begin) / batches, 0.0), 1.0)
        total += share * val_s.get(s.epoch, 0.0) + load_s * loads
        if s.action == "train":
            total += share * train_s.get(s.epoch, 0.0)
    return total


def validate_steps(steps: object, epochs: object) -> None:
    """Check ``steps`` as given to ``replay``: None, or a ``range`` of global steps with step 1, not empty.

    Raises:
        ReplayError: anything else, or ``epochs`` given too.
    """
    if steps is None:
        return
    if not isinstance(steps, range) or steps.step != 1 or steps.start < 0 or len(steps) == 0:
        raise ReplayError(
            f"steps must be a non-empty range of global steps, e.g. steps=range(1000, 2000); got {steps!r}"
        )
    if epochs is not None:
        raise ReplayError("give epochs= or steps=, not both (steps= selects the epochs it touches)")


def epochs_of_steps(steps: range, spans: Mapping[int, tuple[int, int]]) -> list[int]:
    """The epochs whose recorded values (global steps ``spans[e] = (first, last)``) meet ``steps``.

    Example:
        >>> epochs_of_steps(range(10, 14), {0: (0, 12), 1: (12, 24)})
        [0, 1]

    Raises:
        ReplayError: no recorded epoch meets ``steps`` (the message names the recorded steps).
    """
    found = sorted(e for e, (lo, hi) in spans.items() if lo <= steps[-1] and hi >= steps[0])
    if not found:
        have = f"{min(lo for lo, _ in spans.values())}-{max(hi for _, hi in spans.values())}" if spans else "(none)"
        raise ReplayError(
            f"steps {steps.start}-{steps[-1]} were not recorded; the run logged values at global steps {have}. "
            "Choose steps within them."
        )
    return found


def start_inside(first: int, points: Sequence[InsidePoint]) -> InsidePoint | None:
    """The latest checkpoint inside an epoch from which a restart still logs every value at global step
    ``first`` and later: one at a validation's end taken at an earlier step (that validation's values,
    at its own step, precede it), one at a training batch's end at that step or earlier.

    Example:
        >>> start_inside(7, [(3, 2, "validation_end"), (6, 5, "validation_end"), (9, 8, "validation_end")])
        (6, 5, 'validation_end')
        >>> start_inside(6, [(3, 2, "validation_end"), (6, 5, "validation_end")])
        (3, 2, 'validation_end')
        >>> start_inside(6, [(6, 5, "train_batch_end")])
        (6, 5, 'train_batch_end')
    """
    usable = [p for p in points if p[0] < first or (p[0] == first and p[2] == "train_batch_end")]
    return max(usable, default=None)


def slice_steps(
    steps: Sequence[EpochStep],
    keep: range,
    *,
    start: tuple[int, int] | None = None,
    stop: tuple[int, int] | None = None,
) -> list[EpochStep]:
    """``steps`` narrowed to the global steps ``keep``: each stores only values in ``keep``; with ``start``
    (epoch, batch index of a checkpoint inside it), training of that epoch starts from that checkpoint
    (what was planned before it is dropped); with ``stop`` (epoch, batches), that epoch's training stops
    after that many of its batches.

    Example:
        >>> [(s.epoch, s.load, s.start_inside, s.stop_after, s.keep) for s in slice_steps(
        ...     [EpochStep(0, "train", -1)], range(7, 9), start=(0, 5), stop=(0, 9))]
        [(0, None, 5, 9, (7, 9))]
    """
    out = list(steps)
    if start is not None:
        at = next((i for i, s in enumerate(out) if s.epoch == start[0] and s.action == "train" and s.wanted), None)
        if at is not None:
            out = [replace(out[at], load=None, start_inside=start[1]), *out[at + 1 :]]
    if stop is not None:
        out = [replace(s, stop_after=stop[1]) if s.action == "train" and s.epoch == stop[0] else s for s in out]
    return [replace(s, keep=(keep.start, keep.stop)) for s in out]


def split_epoch(step: EpochStep, segments: int, *, cuts: Sequence[int], cost: Sequence[float]) -> list[EpochStep]:
    """Divide the replay of one epoch (``step``) into ``segments`` contiguous segments balanced by ``cost``.

    A restore is divided at its validation points inside (``step.inside``; ``cuts`` is ignored): each segment
    restores and validates its own, the last one the epoch's end too. A train step is divided at ``cuts``,
    the batch indices of checkpoints inside the epoch that a restart continues exactly: a segment starts from
    the checkpoint at its start (the first from ``step.load``) and stops after the batch of the one at its end.
    ``cost`` has one entry per part (a validation point, then the end; or the stretch before each cut, then
    the one after the last), e.g. its recorded seconds. Every value is logged by exactly one segment.

    Example:
        >>> [(s.inside, s.end) for s in split_epoch(EpochStep(0, "restore", 0, inside=(2, 5, 8)), 2, cuts=(),
        ...                                           cost=[1, 1, 1, 1])]
        [((2, 5), False), ((8,), True)]
        >>> [(s.load, s.start_inside, s.stop_after) for s in split_epoch(EpochStep(0, "train", -1), 2,
        ...                                                               cuts=(2, 5, 8), cost=[3, 3, 3, 3])]
        [(-1, None, 6), (None, 5, None)]

    Raises:
        ReplayError: fewer parts than ``segments``.
    """
    parts = len(step.inside) + 1 if step.action == "restore" else len(cuts) + 1
    if not 1 <= segments <= parts:
        where = "validation points (the epoch's end included)" if step.action == "restore" else "stretches between"
        where += "" if step.action == "restore" else " its checkpoints inside that a restart continues exactly"
        raise ReplayError(
            f"segments must be between 1 and the {parts} {where} of epoch {step.epoch}, got {segments}; "
            f"replay with segments<={parts}"
        )
    groups = split_segments(list(range(parts)), segments, dict(enumerate(cost)))
    out = []
    for group in groups:
        first, last = group[0], group[-1]
        if step.action == "restore":
            end = last == parts - 1
            inside = tuple(step.inside[u] for u in group if u < len(step.inside))
            out.append(replace(step, inside=inside) if end else replace(step, load=None, inside=inside, end=False))
        else:
            out.append(
                replace(
                    step,
                    load=step.load if first == 0 else None,
                    start_inside=None if first == 0 else cuts[first - 1],
                    stop_after=None if last == parts - 1 else cuts[last] + 1,
                )
            )
    return out


def bridge(steps: Sequence[EpochStep], starts: Mapping[int, int]) -> list[EpochStep]:
    """``steps`` with each stretch of epochs trained only to reach a wanted one shortened: it starts from the
    checkpoint inside the latest of those epochs that has one (``starts``: epoch -> batch index of its latest
    checkpoint inside that a restart continues exactly), not from the checkpoint before the stretch.

    Example:
        >>> [(s.epoch, s.load, s.start_inside, s.wanted) for s in bridge(
        ...     [EpochStep(1, "train", 0, wanted=False), EpochStep(2, "train", None)], {1: 3})]
        [(1, None, 3, False), (2, None, None, True)]
    """
    out: list[EpochStep] = []
    for s in steps:
        if s.wanted or s.action != "train" or s.epoch not in starts:
            out.append(s)
            continue
        while out and not out[-1].wanted and out[-1].action == "train":  # the stretch before it is not needed
            out.pop()
        out.append(replace(s, load=None, start_inside=starts[s.epoch]))
    return out
