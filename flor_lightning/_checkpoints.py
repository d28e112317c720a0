"""The checkpoint store: the full training state per epoch, stored by content in the background through fsspec.

A checkpoint is a small manifest (the nested training state, each tensor replaced by a reference to a blob) plus
tensor blobs addressed by their xxh3-128, in safetensors packs shared by every run under the root
(:mod:`flor_lightning._blobs`)::

    <root>/<run_id>/epoch=00003.manifest     one per checkpoint (KBs)
    <root>/packs/<id>.safetensors            the blobs new in one checkpoint

It is taken in two halves. :meth:`CheckpointStore.snapshot` runs on the training thread and copies to CPU memory
(pinned, from a GPU) only the tensors that changed since the run's previous checkpoint; a frozen layer, a buffer
or an optimizer state that did not step is neither copied, hashed nor written. :meth:`CheckpointStore.save` hands
the snapshot to one writer thread, which hashes the copies, writes the blobs the root does not hold yet into one
pack, makes it durable, then the manifest (temporary name, fsync, rename), and only then reports it (path, the
manifest's sha256, the bytes it added, the packs it references) for the index. A kill at any moment therefore
leaves no manifest that names a missing blob, and the index never names a manifest that is not there.

Runs recorded before (one ``torch.save`` file per checkpoint, ``.ckpt``, its sha256 in the index) are still read
by :meth:`CheckpointStore.load`; nothing writes that format any more.

The writer competes with training for the CPU, so a local pack is written past the page cache (``O_DIRECT``,
:mod:`flor_lightning._packfile`: 0.10 -> 0.05 CPU-s per 101 MB, and no dirty pages for the kernel to write back on
training's cores), and other files' pages are dropped once durable (a checkpoint is read again only by a replay).
It runs at normal priority: at the lowest (nice 19) it was starved on a busy machine while it held the log store's
write lock, and a recording then failed with "database is locked" after sqlite's 30 s wait.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from flor_lightning._atomic import atomic
from flor_lightning._blobs import (
    FORMAT,
    MANIFEST_SUFFIX,
    BlobStore,
    ChangeTracker,
    Snapshot,
    WriteWatch,
    plain,
    watch_untracked_writes,
)
from flor_lightning._errors import CheckpointError
from flor_lightning._locate import check_writable, fs_for, open_fs, split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a written checkpoint lies and how to verify it.

    Attributes:
        sha256: of the manifest's bytes (of the whole file, for an old ``.ckpt``).
        size: the bytes this checkpoint added to the store (its manifest and its new pack).
        format: :data:`~flor_lightning._blobs.FORMAT`; None for an old ``.ckpt``.
        packs: the packs its manifest references, names relative to the root.
    """

    epoch: int
    step: int
    path: str
    sha256: str
    size: int
    write_seconds: float
    format: str | None = FORMAT
    packs: tuple[str, ...] = ()


def snapshot(state: Any) -> Any:
    """A full copy of ``state`` that later training cannot change, as plain data; tensors land on the CPU.

    Containers are rebuilt as plain dicts/lists/tuples and any object that ``torch.load(weights_only=True)``
    could not read back is replaced by its ``repr`` (as in a checkpoint's manifest). For a whole state saved
    by ``torch.save``; the recorder itself uses :meth:`CheckpointStore.snapshot`, which copies only changes.
    """
    pending: list[torch.Tensor] = []
    copy = plain(state, (), lambda t, _: _copy(t, pending))
    if pending:  # device-to-host copies were issued non-blocking; wait for them once
        torch.cuda.synchronize()
    return copy


def _copy(t: torch.Tensor, pending: list[torch.Tensor]) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t, non_blocking=True)
    pending.append(out)
    return out


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


def write_old(fs: AbstractFileSystem, path: str, state: Any) -> tuple[str, int]:
    """Write ``state`` (a :func:`snapshot`) as runs recorded before manifests did: one ``torch.save`` file,
    hashed with SHA-256 as it is written, made durable and renamed into place; its (sha256, size).

    The recorder no longer writes this format: tests build such stores with it (old runs must still replay,
    gc and push) and benchmarks compare against it.
    """
    with atomic(fs, path) as tmp, fs.open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)  # type: ignore[arg-type]  # a binary file-like object
    return writer.sha256.hexdigest(), writer.size


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
        self.blobs = BlobStore(self.fs, self.root)
        self._tracker = ChangeTracker()
        self._watch: WriteWatch | None = None
        self._index: _LiveIndex | None = None  # the root's blobs, read at the first write

    def check_writable(self, run_dir: str) -> None:
        """Create ``run_dir`` and prove a file can be written there, before training starts."""
        hint = "Point FLOR_HOME or FlorCallback(checkpoint_dir=...) at a writable location."
        check_writable(self.fs, run_dir, what="write checkpoints to", hint=hint)

    def watch(self, module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Watch ``module`` and ``optimizers`` for the writes version counters miss (fused optimizer steps,
        BatchNorm statistics), so that :meth:`snapshot` never takes such a tensor for unchanged."""
        self.unwatch()
        self._watch = watch_untracked_writes(module, optimizers)
        self._tracker = ChangeTracker(watch=self._watch)

    def unwatch(self) -> None:
        """Remove the hooks of :meth:`watch`."""
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def snapshot(self, state: Any, *, verify: bool = False) -> Snapshot:
        """Copy what changed in ``state`` since this store's previous snapshot, on the training thread.

        With ``verify``, also hash every tensor judged unchanged, catching writes no version counter saw
        (``p.data`` writes, custom kernels); the recorder does that for a run's last checkpoint.
        """
        return self._tracker.snapshot(state, verify=verify)

    def path(self, run_id: str, epoch: int, *, batch_idx: int | None = None) -> str:
        """Final path of the checkpoint of ``run_id`` at the end of ``epoch`` (-1: the initial state), or
        inside it after its training batch ``batch_idx``: a local path, or a URL on any other filesystem."""
        return self._url(self._name(run_id, epoch, batch_idx))

    def _url(self, name: str) -> str:
        """The path of ``name`` under the root: local as it is; elsewhere the URL, so that the index (and
        `flor show`) says which filesystem."""
        path = f"{self.root}/{name}"
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)

    @staticmethod
    def _name(run_id: str, epoch: int, batch_idx: int | None = None) -> str:
        """The manifest's name under the root."""
        name = "initial" if epoch < 0 else f"epoch={epoch:05d}"
        if batch_idx is not None:
            name += f"-batch={batch_idx:07d}"
        return f"{run_id}/{name}{MANIFEST_SUFFIX}"

    def save(
        self,
        state: Snapshot,
        run_id: str,
        epoch: int,
        step: int,
        on_done: Callable[[CheckpointInfo], None],
        *,
        batch_idx: int | None = None,
    ) -> None:
        """Write ``state`` (a :meth:`snapshot`) in the background, then call ``on_done``.

        ``batch_idx``: a checkpoint inside ``epoch``, after that training batch (its own name).

        One write is in flight at a time: a new save waits for the previous one, which bounds
        memory to two snapshots. The error of an earlier write is raised by the next ``save``
        (after this write has started) or ``wait``.
        """
        earlier: CheckpointError | None = None
        try:
            self.wait()
        except CheckpointError as err:
            earlier = err
        name = self._name(run_id, epoch, batch_idx)
        self._thread = threading.Thread(
            target=self._write, args=(state, name, epoch, step, on_done), name="flor-checkpoint-writer", daemon=True
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

    def _write(
        self, state: Snapshot, name: str, epoch: int, step: int, on_done: Callable[[CheckpointInfo], None]
    ) -> None:
        cpu = time.thread_time()
        start = self._clock()
        try:
            if self._index is None:  # blobs of earlier checkpoints and other runs: never written again
                self._index = _LiveIndex(self.blobs)
            self._index.checked.clear()
            written = self.blobs.write(state, name, index=self._index)
            self._index.blobs.update(written.new_blobs)
            packs = tuple(sorted(written.packs))
            info = CheckpointInfo(
                epoch,
                step,
                self._url(name),
                written.sha256,
                written.bytes,
                self._clock() - start,
                FORMAT,
                packs,
            )
            on_done(info)
            self.written += 1
            self.bytes_written += written.bytes
            self.last_write_cpu_seconds = time.thread_time() - cpu
        except BaseException as err:  # nothing partial is left under a name a reader looks at
            self._error = (epoch, err)
        finally:
            self.writer_cpu_seconds += time.thread_time() - cpu

    def exists(self, path: str) -> bool:
        """Whether the checkpoint at ``path`` (this store's, or a URL where it was pushed) exists (its manifest,
        or its ``.ckpt`` file)."""
        return bool(fs_for(path, self.fs)[0].exists(path))

    def load(self, path: str, sha256: str | None) -> dict[str, Any]:
        """Read a checkpoint as data, verifying it: the manifest against ``sha256``, each blob against its hash.

        ``path`` is on this store's filesystem, or a URL of another one (where ``flor push`` moved it); its packs
        are read from beside it (``<root>/packs``), local ones mmap-ed. An old ``.ckpt`` is checked against its
        sha256 and read with ``torch.load(weights_only=True)``.

        Raises:
            CheckpointError: the manifest or file is missing, differs from its checksum, or is no checkpoint.
            BlobError: a blob is missing or corrupt (it names the checkpoint and the tensor).
        """
        fs, where = fs_for(path, self.fs)
        if where.endswith(MANIFEST_SUFFIX):
            root, name = split(where)
            return BlobStore(fs, root).load(name, sha256=sha256)
        return _load_old(fs, path, where, sha256)

    def read_state(self, path: str, sha256: str | None) -> dict[str, Any]:
        """The state of a checkpoint without reading its tensors (a manifest's tensors are left out; an old
        ``.ckpt`` file is read whole), e.g. to look at what it says about itself before a replay loads it.

        Raises:
            CheckpointError: the manifest or file is missing, differs from its checksum, or is no checkpoint.
        """
        fs, where = fs_for(path, self.fs)
        if where.endswith(MANIFEST_SUFFIX):
            root, name = split(where)
            state = BlobStore(fs, root).read_manifest(name, sha256=sha256).state
            return state if isinstance(state, dict) else {}
        return _load_old(fs, path, where, sha256)


class _LiveIndex:
    """The root's blobs as the writer consults them: a pack is checked to exist the first time each write reuses
    it, since ``flor gc`` or ``flor push`` may have removed it after the index was read (leaving a moment, between
    the check and the manifest's rename, in which they still could)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.blobs = store.pack_index()
        self.checked: set[str] = set()

    def get(self, blob: str, /) -> str | None:
        pack = self.blobs.get(blob)
        if pack is None or pack in self.checked:
            return pack
        if self.store.fs.exists(f"{self.store.root}/{pack}"):
            self.checked.add(pack)
            return pack
        self.blobs = {b: p for b, p in self.blobs.items() if p != pack}
        return None


def _load_old(fs: Any, path: str, where: str, sha256: str | None) -> dict[str, Any]:
    """A checkpoint in the format before manifests: one ``torch.save`` file, checked against its sha256."""
    try:
        data = fs.cat_file(where)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path!r} is missing") from err
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its sha256 differs from the one recorded")
    try:
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path!r} cannot be read as a flor checkpoint: {err}") from err
    return state
