"""Content-addressed checkpoint storage: a small manifest plus tensor blobs, one safetensors pack per checkpoint.

A checkpoint is the training state (nested dicts, lists, tuples and plain values) with every tensor replaced by a
reference to a blob: ``(path in the state, blob hash, dtype, shape, pack)``. The manifest is that state written with
``torch.save`` of plain containers, so it loads with ``torch.load(weights_only=True)`` and stays small (KBs for a
state of hundreds of MB). Blobs live in pack files in safetensors format (keys: blob hashes), ``packs/<id>.safetensors``
under the store's root: the blobs new in one checkpoint go into ONE pack, so an object store gets two objects per
checkpoint, and a blob the store already holds (an earlier checkpoint of this run or of any run under the same root)
is never written again.

Hash: a blob is addressed by xxh3-128 of its dtype, shape and bytes (the xxhash package: ~17 GB/s, 6 ms per
101 MB on one core here, against 17 ms for BLAKE3 and 61 ms for SHA-256). The address defends against accidents
(a torn or truncated write, a flipped bit, a pack overwritten or mixed up), not against an adversary crafting
collisions, and every blob is verified against its hash when it is loaded. Nothing loaded can run code: manifests
load with ``weights_only=True``, packs are safetensors (a JSON header and raw bytes).

A checkpoint is taken in two halves, as in checkpoints.py. On the training thread, :meth:`ChangeTracker.snapshot`
copies to CPU memory (pinned, from a GPU) only the tensors that changed since the run's previous snapshot, and reuses
the blob of every other one without reading it. On a writer thread, :meth:`BlobStore.write` hashes the copies, writes
the blobs its :class:`BlobIndex` does not know into one pack (temporary name, fsync, rename, fsync of the folder) and
only then the manifest (the same way). A kill at any moment therefore leaves no manifest that names a missing blob.

Which tensors changed, without reading them: a tensor is unchanged when the tensor at the same path in the state has
the same memory (data_ptr, storage offset), shape, stride, dtype, device and version counter (``t._version``) as at
the previous snapshot. The tracker holds the previous tensors, so their memory cannot be reused by a new tensor while
it compares. PyTorch bumps the version counter on every in-place op it dispatches (``mul_``, ``copy_``, ``zero_``,
``nn.init.*_``, ``load_state_dict``, foreach optimizer steps), but NOT (torch 2.13, measured) for:

* fused optimizer kernels (``Adam(fused=True)``, ``AdamW``, ``SGD``): parameters and moments change unseen;
* BatchNorm's running statistics, updated inside the kernel in training forward;
* writes past autograd: ``p.data.mul_(...)``, writes through a ``.numpy()`` view, custom kernels and extensions.

:func:`watch_untracked_writes` closes the first two: public hooks note which optimizer stepped and which module
ran a training forward, and before each snapshot the tracker bumps those tensors' version counters
(``torch.autograd.graph.increment_version``; not inside the forward, where it would break BatchNorm's backward,
which saved the statistics). The third kind cannot be seen without reading the data: ``snapshot(state,
verify=True)`` hashes every tensor the counter calls unchanged, stores it anew where its bytes differ, names it
in :attr:`Snapshot.suspects` and stops trusting the counter for that path. Run it where no training races it (the
last checkpoint of a run, or on demand); between verified snapshots such a write goes unrecorded.

Loading (:meth:`BlobStore.load`) opens a local pack with safetensors' mmap (``safe_open``: the bytes are read once,
from the page cache, by the hash check and then by whoever copies them into the model) and reads a remote one once.
The decisions of gc and push are pure functions over plain data (:func:`deletable_packs`, :func:`push_plan`).
Measured costs: benchmarks/results/blob_store.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import safetensors.torch
import torch
import xxhash
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError, safe_open
from torch.autograd.graph import increment_version

from flor_lightning._atomic import atomic
from flor_lightning._errors import BlobError, CheckpointError, ConfigError
from flor_lightning._locate import PACKS
from flor_lightning._packfile import DTYPE_NAMES, write_direct

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest"
FORMAT = "flor-manifest/1"
HASH = "xxh3-128"
_PACK_METADATA = {"format": "flor-pack/1", "hash": HASH}

TensorPath = tuple[Any, ...]  # keys and indexes from the state's root to a tensor
Identity = tuple[Any, ...]

LEAVES = (int, float, bool, str, type(None), bytes)
# Subclasses of the leaf types (numpy.float64, IntEnum, str mixins) pickle as their own class, which
# weights_only=True refuses to load: they are stored as the plain base type instead.
BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (float, float),
    (int, int),
    (str, str.__str__),  # not str(): a subclass may override __str__ (enum members do)
    (bytes, bytes),
)

# What safetensors stores; other tensors (complex128, quantized, sparse) stay inline in the manifest.
_PACKABLE = frozenset(DTYPE_NAMES)


class BlobIndex(Protocol):
    """Where the store's blobs lie: a blob hash to the pack holding it (a plain ``dict`` is one).

    It must name only packs that exist: a caller that deletes a pack drops its blobs from the index first.
    """

    def get(self, blob: str, /) -> str | None: ...


def content_hash(t: torch.Tensor) -> str:
    """The blob address of a CPU tensor: xxh3-128 of its dtype, shape and bytes, as 32 hex digits."""
    t = t.contiguous()
    h = xxhash.xxh3_128(f"{_dtype_name(t.dtype)}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def tensor_name(path: TensorPath) -> str:
    """A tensor's path in the state, dotted: ``("state_dict", "net.0.weight")`` -> ``state_dict.net.0.weight``."""
    return ".".join(map(str, path))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the training-thread half: which tensors changed, and copies of those ------------------------------------------


class _Slot:
    """One tensor's content as recorded, shared by consecutive snapshots while it does not change.

    The training thread creates it with a CPU copy. The writer sets ``blob`` (the hash), then ``pack`` once that pack
    is durable, and only then drops ``copy``: a reader on another thread finds ``copy`` or ``blob``, read in that order.
    """

    __slots__ = ("blob", "copy", "dtype", "pack", "shape")

    def __init__(self, copy: torch.Tensor) -> None:
        self.copy: torch.Tensor | None = copy
        self.blob: str | None = None
        self.pack: str | None = None
        self.dtype = _dtype_name(copy.dtype)
        self.shape = tuple(copy.shape)


class _Entry(NamedTuple):
    source: torch.Tensor  # held, so that no other tensor can be given its memory while the tracker compares
    identity: Identity | None
    slot: _Slot


@dataclass(frozen=True)
class Snapshot:
    """A training state taken by :meth:`ChangeTracker.snapshot`, ready for :meth:`BlobStore.write`.

    Attributes:
        state: the state with plain containers, each packed tensor replaced by ``None``.
        tensors: each packed tensor's path and content.
        copied: tensors copied by this snapshot (changed, new, or not trusted).
        reused: tensors judged unchanged, neither copied nor to be hashed or written.
        suspects: tensors a verifying snapshot caught changed behind the version counter (dotted paths).
    """

    state: Any
    tensors: tuple[tuple[TensorPath, _Slot], ...]
    copied: int
    reused: int
    suspects: tuple[str, ...]


def identity(t: torch.Tensor) -> Identity | None:
    """What stays equal while ``t`` is unchanged: its memory, layout and version counter (None: no counter)."""
    if t.is_inference():  # no version counter (its detached views report 0 forever): never judged unchanged
        return None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def unchanged(before: Identity | None, now: Identity | None) -> bool:
    """Whether a tensor whose identity was ``before`` at the last snapshot and is ``now`` has not been written."""
    return before is not None and before == now


class ChangeTracker:
    """Takes consecutive snapshots of one run, copying only the tensors that changed since the previous one.

    Hold one per run and pass its snapshots to :meth:`BlobStore.write` in order, one write at a time. It keeps
    the previous snapshot's tensors alive (for parameters and optimizer state, memory that is alive anyway).

    Args:
        watch: the run's :func:`watch_untracked_writes`, bumped before each snapshot (without one, fused
            optimizer steps and BatchNorm statistics go unseen until a verifying snapshot).
    """

    def __init__(self, *, watch: WriteWatch | None = None) -> None:
        self._watch = watch
        self._entries: dict[TensorPath, _Entry] = {}
        self._untrusted: set[TensorPath] = set()

    @property
    def untrusted(self) -> list[str]:
        """Tensors whose version counter missed a write; they are copied and hashed at every snapshot."""
        return sorted(map(tensor_name, self._untrusted))

    def snapshot(self, state: Any, *, verify: bool = False) -> Snapshot:
        """Copy what changed in ``state``; with ``verify``, hash what the version counters call unchanged.

        Runs on the training thread. ``verify`` reads every tensor judged unchanged (from a GPU: a copy to the
        host), so call it where it is worth that, e.g. the last checkpoint of a run.
        """
        if self._watch is not None:
            self._watch.bump()
        found: list[tuple[TensorPath, torch.Tensor]] = []
        skeleton = _skeleton(state, (), found)
        entries: dict[TensorPath, _Entry] = {}
        by_identity: dict[Identity, _Slot] = {}  # one copy of a tensor found at several paths (tied weights)
        pending: list[torch.Tensor] = []  # device-to-host copies in flight
        suspects: list[str] = []
        reused = copied = 0
        for path, t in found:
            now = identity(t)
            slot = self._reuse(path, t, now, verify=verify, suspects=suspects)
            reused += slot is not None
            if slot is None:
                slot = by_identity.get(now) if now is not None else None
            if slot is None:
                slot, copied = _Slot(_copy(t, pending)), copied + 1
            if now is not None:
                by_identity[now] = slot
            entries[path] = _Entry(t, now, slot)
        if pending:
            torch.cuda.synchronize()
        self._entries = entries
        slots = tuple((path, e.slot) for path, e in entries.items())
        return Snapshot(skeleton, slots, copied, reused, tuple(suspects))

    def _reuse(
        self, path: TensorPath, t: torch.Tensor, now: Identity | None, *, verify: bool, suspects: list[str]
    ) -> _Slot | None:
        """The previous snapshot's slot for ``path`` when the tensor there is unchanged, else None."""
        before = self._entries.get(path)
        if before is None or path in self._untrusted or not unchanged(before.identity, now):
            return None
        if verify and content_hash(t.cpu()) != _expected(before.slot):
            self._untrusted.add(path)
            suspects.append(tensor_name(path))
            log.warning("tensor %s changed without its version counter; it is hashed at every checkpoint now", path)
            return None
        return before.slot


def _expected(slot: _Slot) -> str | None:
    copy = slot.copy  # read first: the writer sets blob before it drops copy
    return content_hash(copy) if copy is not None else slot.blob


def _copy(t: torch.Tensor, pending: list[torch.Tensor]) -> torch.Tensor:
    """A contiguous CPU copy of ``t``; from a GPU into pinned memory, issued non-blocking (``pending`` collects it)."""
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    out.copy_(t, non_blocking=True)
    pending.append(out)
    return out


def plain(obj: Any, path: TensorPath, tensor: Callable[[torch.Tensor, TensorPath], Any]) -> Any:
    """``obj`` as plain containers that ``torch.load(weights_only=True)`` reads back, each tensor replaced by
    ``tensor(it detached, its path)``; any other object it could not read back is replaced by its ``repr``."""
    if isinstance(obj, torch.Tensor):
        return tensor(obj.detach(), path)
    if type(obj) in LEAVES:
        return obj
    for base, to_plain in BASES:
        if isinstance(obj, base):
            return to_plain(obj)
    if isinstance(obj, np.generic):  # numpy scalars that are no float/int subclass (float32, int64, bool_)
        return plain(obj.item(), path, tensor)
    if isinstance(obj, Mapping):
        return {k: plain(v, (*path, k), tensor) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):  # torch.Size too: a tuple of ints
        items = [plain(v, (*path, i), tensor) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return repr(obj)


def _skeleton(obj: Any, path: TensorPath, found: list[tuple[TensorPath, torch.Tensor]]) -> Any:
    """``obj`` as plain containers, each packable tensor replaced by None and listed in ``found``."""
    return plain(obj, path, lambda t, p: _tensor_leaf(t, p, found))


def _tensor_leaf(t: torch.Tensor, path: TensorPath, found: list[tuple[TensorPath, torch.Tensor]]) -> Any:
    if t.layout == torch.strided and t.dtype in _PACKABLE and t.device.type != "meta":
        found.append((path, t))
        return None
    return t.to("cpu", copy=True)  # torch.save keeps in the manifest what safetensors cannot hold


class WriteWatch:
    """Notes the in-place writes PyTorch's version counters miss; :meth:`bump` declares them before a snapshot.

    Fused optimizer kernels write parameters and their state unseen, and BatchNorm's kernel updates its running
    statistics unseen (they are saved for backward, so a bump inside the forward would break that backward). The
    hooks only note which parameters had a gradient when an optimizer stepped (what torch's optimizers update) and
    which modules ran a training forward; :meth:`bump` then increments the version counters of those parameters,
    of their optimizer state and of the running statistics, where no autograd graph holds them (a checkpoint
    between steps).
    """

    def __init__(self, module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self._stepped: dict[int, tuple[torch.optim.Optimizer, torch.Tensor]] = {}  # id(param) -> (its optimizer, it)
        self._ran: set[torch.nn.Module] = set()
        self._handles = [opt.register_step_post_hook(self._on_step) for opt in optimizers]
        for m in module.modules():
            if getattr(m, "track_running_stats", False):
                self._handles.append(m.register_forward_hook(self._on_forward))

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._stepped[id(p)] = (optimizer, p)

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self._ran.add(module)

    def bump(self) -> None:
        """Increment the version counters of everything written since the last bump."""
        tensors: list[torch.Tensor] = []
        for opt, param in self._stepped.values():
            state = opt.state.get(param, {})
            tensors += [param, *(v for v in state.values() if isinstance(v, torch.Tensor))]
        for m in self._ran:
            stats = (getattr(m, "running_mean", None), getattr(m, "running_var", None))
            tensors += [t for t in stats if isinstance(t, torch.Tensor)]
        if tensors:
            increment_version(tensors)  # a list in one call: torch >= 2.5
        self._stepped.clear()
        self._ran.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def watch_untracked_writes(module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> WriteWatch:
    """Hooks on ``module`` and ``optimizers`` that make their unseen writes visible to a :class:`ChangeTracker`."""
    return WriteWatch(module, optimizers)


# ---- what a manifest holds ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobRef:
    """One tensor of a checkpoint: where it sits in the state, and the blob that holds it."""

    path: TensorPath
    blob: str
    dtype: str
    shape: tuple[int, ...]
    pack: str

    @property
    def name(self) -> str:
        return tensor_name(self.path)


@dataclass(frozen=True)
class Manifest:
    """A checkpoint as read from its manifest: the state without its packed tensors, and their references."""

    name: str
    state: Any
    tensors: tuple[BlobRef, ...]

    @property
    def packs(self) -> frozenset[str]:
        """The packs this checkpoint needs (names relative to the store's root)."""
        return frozenset(ref.pack for ref in self.tensors)


def _manifest_bytes(snap: Snapshot) -> bytes:
    refs = [(path, slot.blob, slot.dtype, slot.shape, slot.pack) for path, slot in snap.tensors]
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "hash": HASH, "state": snap.state, "tensors": refs}, buf)
    return buf.getvalue()


def _parse_manifest(name: str, data: bytes) -> Manifest:
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {name!r} cannot be read as a flor manifest: {err}") from err
    found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    if found != FORMAT:
        raise CheckpointError(f"checkpoint {name!r} is not a flor manifest: expected format {FORMAT!r}, got {found!r}")
    try:
        refs = tuple(BlobRef(tuple(p), str(b), str(d), tuple(s), str(k)) for p, b, d, s, k in raw["tensors"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {name!r} has a damaged tensor list: {err}") from err
    return Manifest(name, raw.get("state"), refs)


def _fill(node: Any, path: TensorPath, tensors: Mapping[TensorPath, torch.Tensor]) -> Any:
    """The state ``node`` with the tensor of each path in ``tensors`` put back in its place."""
    if path in tensors:
        return tensors[path]
    if isinstance(node, dict):
        return {k: _fill(v, (*path, k), tensors) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        items = [_fill(v, (*path, i), tensors) for i, v in enumerate(node)]
        return items if isinstance(node, list) else tuple(items)
    return node


# ---- the writer half and loading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """What :meth:`BlobStore.write` stored.

    Attributes:
        manifest: the manifest's name (relative to the root).
        pack: the new pack's name, None when every blob was in the store already.
        new_blobs: blob hash -> pack for the blobs written now: add them to the caller's index.
        bytes: bytes written (pack and manifest).
        hashed: tensors hashed by this write (the others were reused from the previous snapshot).
        sha256: the SHA-256 of the manifest's bytes (a few KB: what an index records to check it by).
        packs: every pack the checkpoint references (new or earlier), names relative to the root.
    """

    manifest: str
    pack: str | None
    new_blobs: dict[str, str]
    bytes: int
    hashed: int
    sha256: str = ""
    packs: frozenset[str] = frozenset()


def _hash(slot: _Slot) -> bool:
    """Set ``slot.blob`` from its copy unless known; whether it hashed."""
    copy = slot.copy
    if slot.blob is not None or copy is None:
        return False
    slot.blob = content_hash(copy)
    return True


Resolve = Callable[[str], str]  # an object's name (relative to the root) -> the path or URL where it lies now


class BlobStore:
    """Manifests and packs under one root folder of an fsspec filesystem.

    Args:
        fs: the filesystem (``fsspec.filesystem("file")``, ``"memory"``, s3fs, ...).
        root: the root folder on ``fs`` (a project's checkpoint folder).
    """

    def __init__(self, fs: AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def write(self, snap: Snapshot, manifest: str, *, index: BlobIndex) -> Written:
        """Store ``snap`` as the checkpoint ``manifest`` (a name ending in ``.manifest``, relative to the root).

        Runs on a writer thread: hashes the tensors the snapshot copied, writes those ``index`` does not know into
        one new pack, makes it durable, then writes the manifest. On failure nothing is left under either name and
        the snapshot's copies are kept, so the next write of the run stores them.
        """
        if not manifest.endswith(MANIFEST_SUFFIX) or ".tmp-" in manifest:
            raise ConfigError(f"checkpoint name {manifest!r} must end in {MANIFEST_SUFFIX!r} (and hold no '.tmp-')")
        todo = list({id(s): s for _, s in snap.tensors if s.pack is None}.values())
        hashed = sum(_hash(slot) for slot in todo)
        known = {str(s.blob): where for s in todo if (where := index.get(str(s.blob))) is not None}
        fresh = {str(s.blob): s.copy for s in todo if s.blob not in known and s.copy is not None}
        pack = f"{PACKS}/{uuid.uuid4().hex}.safetensors" if fresh else None
        size = self._put(pack, lambda tmp: self._write_pack(tmp, fresh)) if pack else 0
        for slot in todo:  # the pack is durable: the copies can go
            slot.pack = pack if slot.blob in fresh else known[str(slot.blob)]
            slot.copy = None
        data = _manifest_bytes(snap)
        size += self._put(manifest, lambda tmp: self._write_bytes(tmp, data))
        packs = frozenset(str(slot.pack) for _, slot in snap.tensors)
        new = dict.fromkeys(fresh, pack) if pack else {}
        return Written(manifest, pack, new, size, hashed, hashlib.sha256(data).hexdigest(), packs)

    def _put(self, name: str, write: Callable[[str], None]) -> int:
        """Write the object ``name`` through ``write(temporary path)``, fsync, rename into place; return its size."""
        final = f"{self.root}/{name}"
        with atomic(self.fs, final) as tmp:
            write(tmp)
        return int(self.fs.size(final))

    def _write_pack(self, tmp: str, tensors: dict[str, torch.Tensor]) -> None:
        if isinstance(self.fs, LocalFileSystem):  # past the page cache where it can; else safetensors' own writer
            if not write_direct(tmp, tensors, _PACK_METADATA):
                safetensors.torch.save_file(tensors, tmp, metadata=_PACK_METADATA)
        else:
            self._write_bytes(tmp, safetensors.torch.save(tensors, metadata=_PACK_METADATA))

    def _write_bytes(self, tmp: str, data: bytes) -> None:
        with self.fs.open(tmp, "wb") as f:
            f.write(data)

    def _locate(self, where: str) -> tuple[AbstractFileSystem, str]:
        if "://" not in where:
            return self.fs, where
        try:
            fs, path = url_to_fs(where)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"cannot open {where!r}: {err}. Install its fsspec backend (e.g. s3fs)") from err
        return fs, path

    def _default_resolve(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_manifest(self, name: str, *, resolve: Resolve | None = None, sha256: str | None = None) -> Manifest:
        """Read the manifest ``name`` (from this root, or where ``resolve(name)`` says it lies now); with
        ``sha256``, check its bytes against it first.

        Raises:
            CheckpointError: it is missing, its bytes differ from ``sha256``, or it is not a flor manifest.
        """
        fs, path = self._locate((resolve or self._default_resolve)(name))
        try:
            data = fs.cat_file(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {name!r} is missing (looked at {path!r})") from err
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(
                f"checkpoint {name!r} is corrupt: its manifest's sha256 differs from the one recorded"
            )
        return _parse_manifest(name, data)

    def load(self, name: str, *, resolve: Resolve | None = None, sha256: str | None = None) -> dict[str, Any]:
        """The training state of checkpoint ``name``, every blob verified against its hash.

        ``resolve`` maps an object's name (the manifest's, a pack's) to the path or URL where it lies now, for a
        store pushed in part elsewhere; by default everything is under this root. Tensors are fresh CPU tensors
        (local packs: mmap-ed, copy-on-write), one per path even where several paths hold the same blob.

        Raises:
            CheckpointError: the manifest is missing or damaged (or differs from ``sha256``, where given).
            BlobError: a blob is missing or its bytes do not match its hash.
        """
        resolve = resolve or self._default_resolve
        manifest = self.read_manifest(name, resolve=resolve, sha256=sha256)
        by_pack: dict[str, list[BlobRef]] = {}
        for ref in manifest.tensors:
            by_pack.setdefault(ref.pack, []).append(ref)
        blobs: dict[str, torch.Tensor] = {}
        for pack, refs in by_pack.items():
            blobs.update(self._read_pack(name, pack, refs, resolve(pack)))
        placed: dict[TensorPath, torch.Tensor] = {}
        used: set[str] = set()
        for ref in manifest.tensors:  # a blob at several paths: a copy each, so in-place updates stay apart
            placed[ref.path] = blobs[ref.blob].clone() if ref.blob in used else blobs[ref.blob]
            used.add(ref.blob)
        state: dict[str, Any] = _fill(manifest.state, (), placed)
        return state

    def _read_pack(self, name: str, pack: str, refs: list[BlobRef], where: str) -> dict[str, torch.Tensor]:
        """The blobs ``refs`` need from ``pack``, verified."""
        fs, path = self._locate(where)
        wanted = {ref.blob for ref in refs}
        try:
            if isinstance(fs, LocalFileSystem):
                with safe_open(path, framework="pt") as f:
                    got = {b: f.get_tensor(b) for b in wanted & set(f.keys())}
            else:
                got = {b: t for b, t in safetensors.torch.load(fs.cat_file(path)).items() if b in wanted}
        except (OSError, SafetensorError) as err:
            raise BlobError(name, refs[0].name, f"is in pack {pack!r}, which is missing or unreadable ({err})") from err
        for ref in refs:
            t = got.get(ref.blob)
            if t is None:
                raise BlobError(name, ref.name, f"is missing from pack {pack!r} (blob {ref.blob})")
            if content_hash(t) != ref.blob:
                raise BlobError(name, ref.name, f"is corrupt in pack {pack!r}: its bytes do not hash to {ref.blob}")
        return got

    def manifests(self) -> list[str]:
        """The names of all manifests under the root, sorted."""
        return self._names(f"{self.root}/**/*{MANIFEST_SUFFIX}")

    def packs(self) -> list[str]:
        """The names of all packs under the root, sorted."""
        return self._names(f"{self.root}/{PACKS}/*.safetensors")

    def _names(self, pattern: str) -> list[str]:
        prefix = f"{self.root}/"
        return sorted(str(p).removeprefix(prefix) for p in self.fs.glob(pattern))

    def pack_index(self) -> dict[str, str]:
        """A :class:`BlobIndex` read from the packs' headers (a few KB each, no tensor read): every blob held."""
        index: dict[str, str] = {}
        for pack in self.packs():
            try:
                with self.fs.open(f"{self.root}/{pack}", "rb") as f:
                    (length,) = np.frombuffer(f.read(8), dtype="<u8")
                    header = json.loads(f.read(int(length)))
            except (OSError, ValueError) as err:
                log.warning("skipping pack %s while indexing blobs: %s", pack, err)
                continue
            index.update(dict.fromkeys((k for k in header if k != "__metadata__"), pack))
        return index

    def rebuild_index(self) -> dict[str, str]:
        """A :class:`BlobIndex` read from the manifests on disk: each blob they reference whose pack exists."""
        packs = set(self.packs())
        index: dict[str, str] = {}
        for name in self.manifests():
            try:
                manifest = self.read_manifest(name)
            except CheckpointError as err:
                log.warning("skipping %s while indexing blobs: %s", name, err)
                continue
            for ref in manifest.tensors:
                if ref.pack in packs:
                    index.setdefault(ref.blob, ref.pack)
        return index


# ---- gc and push decisions ----------------------------------------------------------------------------------------


def deletable_packs(packs: Iterable[str], kept: Iterable[Collection[str]]) -> list[str]:
    """The packs no kept checkpoint references, sorted.

    Args:
        packs: every pack of the store.
        kept: for each checkpoint that stays, the packs it references (:attr:`Manifest.packs`).
    """
    referenced: set[str] = set()
    for names in kept:
        referenced.update(names)
    return sorted(set(packs) - referenced)


def push_plan(manifests: Mapping[str, Collection[str]], *, remote: Collection[str]) -> list[str]:
    """The objects to move so that the checkpoints ``manifests`` are at the destination, in a safe order.

    Each manifest comes after every pack it references, so a push stopped anywhere (and resumed by planning
    again) never leaves a manifest where its packs are not, and every checkpoint stays loadable from the
    places a resolver knows.

    Args:
        manifests: each checkpoint to push -> the packs it references (:attr:`Manifest.packs`).
        remote: the objects the destination holds already.
    """
    plan: list[str] = []
    done = set(remote)
    for name in sorted(manifests):
        for obj in [*sorted(manifests[name]), name]:
            if obj not in done:
                plan.append(obj)
                done.add(obj)
    return plan
