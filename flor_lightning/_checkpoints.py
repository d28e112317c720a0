"""The checkpoint store: full training state per epoch, written in the background through fsspec.

A checkpoint is taken in two halves. :func:`snapshot` runs on the training thread and copies
every tensor once into CPU memory (pinned, when it comes from a GPU), so training may go on
changing its weights. :meth:`CheckpointStore.save` hands that copy to one writer thread, which
serializes it straight into the destination file under a temporary name while hashing the
bytes, makes it durable, renames it into place and only then reports it (path, sha256, size).
A reader therefore never sees half a file, and the index never names a file that is not there.

The writer competes with training for the CPU and memory, so once a local file is durable its
pages are dropped from the page cache (a checkpoint is read again only by a replay), sparing the
kernel the memory pressure of hundreds of MB written per epoch. It runs at normal priority: at
the lowest (nice 19) it was starved on a busy machine while it held the log store's write lock,
and a recording then failed with "database is locked" after sqlite's 30 s wait.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from flor_lightning._atomic import atomic
from flor_lightning._errors import CheckpointError
from flor_lightning._locate import check_writable, fs_for, open_fs

log = logging.getLogger(__name__)

_LEAVES = (int, float, bool, str, type(None), bytes)
# Subclasses of the leaf types (numpy.float64, IntEnum, str mixins) pickle as their own class,
# which weights_only=True refuses to load: they are stored as the plain base type instead.
_BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (float, float),
    (int, int),
    (str, str.__str__),  # not str(): a subclass may override __str__ (enum members do)
    (bytes, bytes),
)


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a written checkpoint lies and how to verify it."""

    epoch: int
    step: int
    path: str
    sha256: str
    size: int
    write_seconds: float


def snapshot(state: Any) -> Any:
    """Copy ``state`` so that later training cannot change it; tensors land on the CPU.

    Containers are rebuilt as plain dicts/lists/tuples and any object that
    ``torch.load(weights_only=True)`` could not read back is replaced by its ``repr``, so
    every checkpoint stays loadable as data.
    """
    pending: list[torch.Tensor] = []
    copy = _copy(state, pending)
    if pending:  # device-to-host copies were issued non-blocking; wait for them once
        torch.cuda.synchronize()
    return copy


def _copy(obj: Any, pending: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        if obj.device.type == "cpu":
            return obj.clone()
        out = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        out.copy_(obj, non_blocking=True)
        pending.append(out)
        return out
    if type(obj) in _LEAVES:
        return obj
    for base, plain in _BASES:
        if isinstance(obj, base):
            return plain(obj)
    if isinstance(obj, np.generic):  # numpy scalars that are no float/int subclass (float32, int64, bool_)
        return _copy(obj.item(), pending)
    if isinstance(obj, Mapping):
        return {k: _copy(v, pending) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_copy(v, pending) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, torch.Size):
        return tuple(obj)
    return repr(obj)


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        self.sha256.update(view)
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes


class CheckpointStore:
    """Writes and reads checkpoints under one root (``~/.flor/<project>`` by default).

    Args:
        url: root folder, local path or fsspec URL (``memory://flor``, ``s3://bucket/flor``).
        clock: returns seconds; injected so tests can control write timings.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.url = url
        self.fs, self.root = open_fs(url)
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self.blocked_seconds = 0.0  # training-thread time spent waiting for an earlier write
        self.writer_cpu_seconds = 0.0  # CPU time of the writer thread
        self.written = 0  # checkpoints written (renamed into place)
        self.bytes_written = 0
        self.last_write_cpu_seconds: float | None = None  # writer CPU of the latest successful write

    def check_writable(self, run_dir: str) -> None:
        """Create ``run_dir`` and prove a file can be written there, before training starts."""
        hint = "Point FLOR_HOME or FlorCallback(checkpoint_dir=...) at a writable location."
        check_writable(self.fs, run_dir, what="write checkpoints to", hint=hint)

    def path(self, run_id: str, epoch: int, *, batch_idx: int | None = None) -> str:
        """Final path of the checkpoint of ``run_id`` at the end of ``epoch`` (-1: the initial state), or
        inside it after its training batch ``batch_idx``: a local path, or a URL on any other filesystem."""
        name = "initial" if epoch < 0 else f"epoch={epoch:05d}"
        if batch_idx is not None:
            name += f"-batch={batch_idx:07d}"
        path = f"{self.root}/{run_id}/{name}.ckpt"
        # a local path as it is; elsewhere the URL, so the index (and `flor show`) says which filesystem
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)

    def save(
        self,
        state: Any,
        run_id: str,
        epoch: int,
        step: int,
        on_done: Callable[[CheckpointInfo], None],
        *,
        batch_idx: int | None = None,
    ) -> None:
        """Write ``state`` (already a :func:`snapshot`) in the background, then call ``on_done``.

        ``batch_idx``: a checkpoint inside ``epoch``, after that training batch (its own file name).

        One write is in flight at a time: a new save waits for the previous one, which bounds
        memory to two snapshots. The error of an earlier write is raised by the next ``save``
        (after this write has started) or ``wait``.
        """
        earlier: CheckpointError | None = None
        try:
            self.wait()
        except CheckpointError as err:
            earlier = err
        self._thread = threading.Thread(
            target=self._write,
            args=(state, self.path(run_id, epoch, batch_idx=batch_idx), epoch, step, on_done),
            name="flor-checkpoint-writer",
            daemon=True,
        )
        self._thread.start()
        if earlier is not None:
            raise earlier

    def join(self) -> None:
        """Block until the write in flight (if any) is done; its error is left for ``wait``."""
        if self._thread is not None:
            start = self._clock()
            self._thread.join()
            self.blocked_seconds += self._clock() - start
            self._thread = None

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; raise its error."""
        self.join()
        if self._error is not None:
            (epoch, err), self._error = self._error, None
            raise CheckpointError(
                f"writing the checkpoint of epoch {epoch} under {self.url!r} failed: {err}. Free space or "
                "fix permissions there; nothing partial is left under a checkpoint's name"
            ) from err

    def _write(self, state: Any, final: str, epoch: int, step: int, on_done: Callable[[CheckpointInfo], None]) -> None:
        cpu = time.thread_time()
        start = self._clock()
        try:
            with atomic(self.fs, final) as tmp, self.fs.open(tmp, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(state, writer)  # type: ignore[arg-type]  # a binary file-like object
            info = CheckpointInfo(epoch, step, final, writer.sha256.hexdigest(), writer.size, self._clock() - start)
            on_done(info)
            self.written += 1
            self.bytes_written += writer.size
            self.last_write_cpu_seconds = time.thread_time() - cpu
        except BaseException as err:  # atomic() left nothing under the checkpoint's name
            self._error = (epoch, err)
        finally:
            self.writer_cpu_seconds += time.thread_time() - cpu

    def exists(self, path: str) -> bool:
        """Whether the checkpoint file at ``path`` (this store's, or a URL where it was pushed) exists."""
        return bool(fs_for(path, self.fs)[0].exists(path))

    def load(self, path: str, sha256: str | None) -> dict[str, Any]:
        """Read a checkpoint as data (``weights_only=True``), verifying its checksum first.

        ``path`` is on this store's filesystem, or a URL of another one (where ``flor push`` moved it).

        Raises:
            CheckpointError: the file is missing, its checksum differs, or it is not a checkpoint.
        """
        try:
            data = fs_for(path, self.fs)[0].cat_file(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {path!r} is missing") from err
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"checkpoint {path!r} is corrupt: its sha256 differs from the one recorded")
        try:
            state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"checkpoint {path!r} cannot be read as a flor checkpoint: {err}") from err
        return state
