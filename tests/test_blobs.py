"""Content-addressed checkpoint storage (flor_lightning._blobs): format, change tracking, integrity, gc and push.

Stores are real: a local folder in tmp_path (safetensors' mmap path) or fsspec's ``memory://`` (the object-store
path). The only stand-in is a memory filesystem that fails one rename, as a full disk would.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from lightning.pytorch.plugins.io import CheckpointIO
from models import DigitsClassifier, DigitsData, trainer_kwargs
from safetensors import safe_open
from torch import nn

from flor_lightning._blobs import (
    BlobStore,
    ChangeTracker,
    Snapshot,
    Written,
    content_hash,
    deletable_packs,
    push_plan,
    watch_untracked_writes,
)
from flor_lightning._errors import BlobError, CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers --------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """A store on a local folder and one on fsspec's memory filesystem."""
    if request.param == "local":
        yield BlobStore(fsspec.filesystem("file"), str(tmp_path / "ckpt"))
        return
    root = f"/blobs-{uuid.uuid4().hex}"
    yield BlobStore(fsspec.filesystem("memory"), root)
    memory = fsspec.filesystem("memory")
    if memory.exists(root):
        memory.rm(root, recursive=True)


@pytest.fixture
def local(tmp_path: Path) -> BlobStore:
    return BlobStore(fsspec.filesystem("file"), str(tmp_path / "ckpt"))


def save(tracker: ChangeTracker, store: BlobStore, state: Any, name: str, index: dict[str, str]) -> Written:
    written = store.write(tracker.snapshot(state), name, index=index)
    index.update(written.new_blobs)
    return written


def same(a: Any, b: Any) -> bool:
    """Deep equality: tensors by dtype, shape and values; lists, tuples and leaves by type too."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):  # an OrderedDict state_dict is stored as a dict
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def mixed_state() -> dict[str, Any]:
    """Every kind of value a training state holds, tensors of every dtype and shape that need care."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, generator=g)
    tied = torch.randn(3, 4, generator=g)
    return {
        "f32": torch.randn(5, 6, generator=g),
        "transposed": torch.randn(6, 5, generator=g).t(),  # not contiguous
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bool": torch.tensor([True, False, True]),
        "i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "scalar": torch.tensor(2.5),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "view_a": base[0:20],  # two overlapping views of one storage
        "view_b": base[10:30],
        "tied": [tied, tied],  # one tensor at two paths
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}, 1: {"step": torch.tensor(3.0)}}
        },
        "leaves": (1, 2.0, "three", None, True, b"bytes", [torch.Size([2, 3])]),
        "np_float": np.float32(1.5),
        "obj": object(),
    }


# ---- the format -----------------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_value_dtype_and_container(store: BlobStore) -> None:
    state = mixed_state()
    save(ChangeTracker(), store, state, "run/a.manifest", {})
    loaded = store.load("run/a.manifest")
    expected = {k: v for k, v in state.items() if k not in ("np_float", "obj")}
    expected["leaves"] = (1, 2.0, "three", None, True, b"bytes", [(2, 3)])  # torch.Size is stored as a tuple
    assert same({k: loaded[k] for k in expected}, expected)
    assert loaded["np_float"] == 1.5 and type(loaded["np_float"]) is float
    assert loaded["obj"].startswith("<object object at")  # what weights_only cannot load is kept as its repr
    assert loaded["transposed"].is_contiguous()


def test_tensors_safetensors_cannot_hold_stay_inline_in_the_manifest(store: BlobStore) -> None:
    state = {"c128": torch.randn(3, dtype=torch.complex128), "sparse": torch.eye(3).to_sparse(), "w": torch.ones(2)}
    written = save(ChangeTracker(), store, state, "run/a.manifest", {})
    assert [ref.name for ref in store.read_manifest("run/a.manifest").tensors] == ["w"] and written.hashed == 1
    loaded = store.load("run/a.manifest")
    assert same(loaded["c128"], state["c128"]) and torch.equal(loaded["sparse"].to_dense(), torch.eye(3))


def test_tensors_that_shared_memory_or_content_load_as_separate_tensors(store: BlobStore) -> None:
    state = mixed_state()
    save(ChangeTracker(), store, state, "run/a.manifest", {})
    loaded = store.load("run/a.manifest")
    # the equal Adam step tensors are one blob, the tied tensor too: each path still gets a tensor of its own
    steps = [loaded["optimizer"]["state"][i]["step"] for i in (0, 1)]
    steps[0].add_(1)  # Optimizer.load_state_dict keeps such tensors and steps them in place
    assert steps[1].item() == 3.0 and steps[0].item() == 4.0
    loaded["tied"][0].zero_()
    assert torch.equal(loaded["tied"][1], state["tied"][1])
    loaded["view_a"][15] = 100.0
    assert loaded["view_b"][5].item() == state["view_b"][5].item()


def test_manifest_is_small_plain_data_that_loads_with_weights_only(local: BlobStore) -> None:
    state = {"net": {f"w{i}": torch.randn(256, 256) for i in range(8)}, "epoch": 3, "keys": {1: "int key"}}
    written = save(ChangeTracker(), local, state, "run/a.manifest", {})
    data = Path(local.root, "run/a.manifest").read_bytes()
    raw = torch.load(io.BytesIO(data), weights_only=True)
    assert raw["format"] == "flor-manifest/1" and raw["hash"] == "xxh3-128"
    assert raw["state"] == {"net": dict.fromkeys(state["net"]), "epoch": 3, "keys": {1: "int key"}}
    assert len(raw["tensors"]) == 8 and all(not isinstance(t, torch.Tensor) for ref in raw["tensors"] for t in ref)
    assert len(data) < 4096  # for 2 MB of tensors
    assert written.bytes == len(data) + Path(local.root, str(written.pack)).stat().st_size


def test_new_blobs_of_a_checkpoint_go_into_one_safetensors_pack_keyed_by_hash(local: BlobStore) -> None:
    state = {f"t{i}": torch.randn(10, i + 1) for i in range(12)}
    written = save(ChangeTracker(), local, state, "run/a.manifest", {})
    assert local.packs() == [written.pack] and written.hashed == 12
    with safe_open(str(Path(local.root, str(written.pack))), framework="pt") as f:
        assert set(f.keys()) == {content_hash(t) for t in state.values()} == set(written.new_blobs)
        assert f.metadata() == {"format": "flor-pack/1", "hash": "xxh3-128"}


def test_an_unchanged_state_costs_a_manifest_only(store: BlobStore) -> None:
    tracker, index = ChangeTracker(), {}
    state = {"w": torch.randn(100, 100), "b": torch.randn(100), "epoch": 0}
    save(tracker, store, state, "run/0.manifest", index)
    state["epoch"] = 1
    snap = tracker.snapshot(state)
    assert (snap.copied, snap.reused) == (0, 2)
    written = store.write(snap, "run/1.manifest", index=index)
    assert (written.pack, written.hashed, written.new_blobs) == (None, 0, {})
    assert written.bytes < 2048 and len(store.packs()) == 1
    assert same(store.load("run/1.manifest"), state)


def test_runs_of_one_root_share_blobs_through_an_index_rebuilt_from_the_manifests(store: BlobStore) -> None:
    backbone = {f"layer{i}": torch.randn(64, 64) for i in range(4)}
    run_a = {"backbone": backbone, "head": torch.randn(10, 64)}
    first = save(ChangeTracker(), store, run_a, "a/0.manifest", {})

    index = BlobStore(store.fs, store.root).rebuild_index()  # a later process: nothing but the files
    assert index == first.new_blobs
    run_b = {"backbone": {k: v.clone() for k, v in backbone.items()}, "head": torch.randn(10, 64)}
    second = save(ChangeTracker(), store, run_b, "b/0.manifest", index)
    assert second.hashed == 5 and list(second.new_blobs) == [content_hash(run_b["head"])]
    assert store.read_manifest("b/0.manifest").packs == {first.pack, second.pack}
    assert same(store.load("b/0.manifest"), run_b)


def test_any_object_with_get_serves_as_the_index() -> None:
    class Lookups:  # what a sqlite-backed index looks like to the writer
        def __init__(self, rows: dict[str, str]) -> None:
            self.rows, self.asked = rows, []

        def get(self, blob: str, /) -> str | None:
            self.asked.append(blob)
            return self.rows.get(blob)

    store = BlobStore(fsspec.filesystem("memory"), f"/blobs-{uuid.uuid4().hex}")
    t = torch.randn(8)
    first = store.write(ChangeTracker().snapshot({"t": t}), "a/0.manifest", index={})
    index = Lookups(first.new_blobs)
    second = store.write(ChangeTracker().snapshot({"t": t.clone()}), "b/0.manifest", index=index)
    assert index.asked == [content_hash(t)] and second.pack is None
    assert store.read_manifest("b/0.manifest").packs == {first.pack}


def test_a_pack_gone_from_disk_is_left_out_of_the_rebuilt_index(local: BlobStore) -> None:
    state = {"w": torch.randn(32, 32)}
    first = save(ChangeTracker(), local, state, "a/0.manifest", {})
    Path(local.root, str(first.pack)).unlink()
    index = local.rebuild_index()
    assert index == {}
    second = save(ChangeTracker(), local, state, "b/0.manifest", index)
    assert second.pack is not None and same(local.load("b/0.manifest"), state)


def test_a_name_without_the_manifest_suffix_is_refused_before_anything_is_written(store: BlobStore) -> None:
    with pytest.raises(ConfigError, match=r"must end in '\.manifest'"):
        store.write(ChangeTracker().snapshot({"w": torch.ones(2)}), "run/epoch=1.ckpt", index={})
    assert store.fs.find(store.root) == []


# ---- which tensors changed ------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def training_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}


def step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    net(torch.randn(16, 6)).pow(2).mean().backward()
    opt.step()


def _no_grad(fn: Any) -> Any:
    def run(net: Net, opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            fn(net, opt)

    return run


def _load_other(net: Net, opt: torch.optim.Optimizer) -> None:
    other = Net()
    with torch.no_grad():
        other.head.bias.fill_(9.0)
    net.load_state_dict(other.state_dict())


def _batchnorm_forward(net: Net, opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        net(torch.randn(16, 6) * 3 + 1)


def _load_other_optimizer_state(net: Net, opt: torch.optim.Optimizer) -> None:
    other = copy.deepcopy(opt.state_dict())
    for group in other["param_groups"]:
        group["lr"] *= 0.5  # a change even where the optimizer keeps no tensors (SGD without momentum)
    for state in other["state"].values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.add_(1)
    opt.load_state_dict(other)


IN_PLACE = {
    "no_grad mul_": _no_grad(lambda net, opt: net.head.weight.mul_(2)),
    "copy_": _no_grad(lambda net, opt: net.head.bias.copy_(torch.arange(3.0))),
    "zero_": _no_grad(lambda net, opt: net.body[0].bias.zero_()),
    "nn.init.normal_": lambda net, opt: nn.init.normal_(net.head.weight),
    "nn.init.kaiming_uniform_": lambda net, opt: nn.init.kaiming_uniform_(net.body[0].weight),
    "load_state_dict": _load_other,
    "batchnorm running stats in forward": _batchnorm_forward,
}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "sgd-momentum-fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam-for-loop": lambda p: torch.optim.Adam(p, foreach=False),
    "adam-foreach": lambda p: torch.optim.Adam(p, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, fused=True),
}
OPTIMIZER_WRITES = {"optimizer step": step, "optimizer load_state_dict": _load_other_optimizer_state}


def stored_after(store: BlobStore, net: Net, opt: torch.optim.Optimizer, write: Any) -> Snapshot:
    """Checkpoint, ``write``, checkpoint again: the second checkpoint must hold the live state."""
    tracker, index = ChangeTracker(watch=watch_untracked_writes(net, [opt])), {}
    step(net, opt)  # the optimizer has state
    save(tracker, store, training_state(net, opt), "run/0.manifest", index)
    write(net, opt)
    snap = tracker.snapshot(training_state(net, opt))
    store.write(snap, "run/1.manifest", index=index)
    live = training_state(net, opt)
    assert same(store.load("run/1.manifest"), live)
    assert not same(store.load("run/0.manifest"), live), "the write changed nothing: the test proves nothing"
    return snap


@pytest.mark.parametrize("op", list(IN_PLACE))
def test_every_in_place_write_pytorch_tracks_is_stored(store: BlobStore, op: str) -> None:
    net = Net()
    snap = stored_after(store, net, torch.optim.Adam(net.parameters()), IN_PLACE[op])
    assert snap.reused > 0  # what the write did not touch was not copied


@pytest.mark.parametrize("write", list(OPTIMIZER_WRITES))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_write_is_stored(store: BlobStore, optimizer: str, write: str) -> None:
    net = Net()
    stored_after(store, net, OPTIMIZERS[optimizer](net.parameters()), OPTIMIZER_WRITES[write])


def test_unchanged_tensors_are_neither_copied_nor_hashed_nor_written(store: BlobStore) -> None:
    net = Net()
    net.body.requires_grad_(False).eval()  # a frozen backbone
    opt = torch.optim.Adam(net.parameters(), fused=True)
    tracker, index = ChangeTracker(watch=watch_untracked_writes(net, [opt])), {}
    step(net, opt)
    save(tracker, store, training_state(net, opt), "run/0.manifest", index)
    step(net, opt)
    snap = tracker.snapshot(training_state(net, opt))
    head = {f"state_dict.head.{p}" for p in ("weight", "bias")}
    moments = {f"optimizer_states.0.state.{i}.{k}" for i in (4, 5) for k in ("step", "exp_avg", "exp_avg_sq")}
    assert copied_names(snap) == head | moments and snap.copied == 8
    assert snap.reused == len(snap.tensors) - 8  # the backbone: 7 tensors, none read
    written = store.write(snap, "run/1.manifest", index=index)
    assert written.hashed == 8 and len(written.new_blobs) == 7  # the two head step tensors are one blob
    assert same(store.load("run/1.manifest"), training_state(net, opt))


def test_a_backbone_frozen_mid_run_costs_nothing_though_its_optimizer_state_stays(store: BlobStore) -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), fused=True)
    tracker, index = ChangeTracker(watch=watch_untracked_writes(net, [opt])), {}
    step(net, opt)  # every parameter now has Adam state
    net.body.requires_grad_(False).eval()
    step(net, opt)
    save(tracker, store, training_state(net, opt), "run/0.manifest", index)
    step(net, opt)
    snap = tracker.snapshot(training_state(net, opt))
    assert not any(
        name.startswith(("state_dict.body", *(f"optimizer_states.0.state.{i}." for i in range(4))))
        for name in copied_names(snap)
    ), copied_names(snap)
    assert len(copied_names(snap)) == 8  # the head's weight and bias, and their step, exp_avg and exp_avg_sq
    store.write(snap, "run/1.manifest", index=index)
    assert same(store.load("run/1.manifest"), training_state(net, opt))


def test_pytorch_misses_fused_steps_and_batchnorm_stats_which_the_hooks_and_verify_catch(store: BlobStore) -> None:
    """A canary: if PyTorch starts bumping these version counters itself, watch_untracked_writes can go."""
    net = Net()
    opt = torch.optim.Adam(net.parameters(), fused=True)
    step(net, opt)
    weight, mean = net.head.weight.detach(), net.body[1].running_mean.detach()
    before = (weight._version, mean._version, weight.clone(), mean.clone())
    step(net, opt)  # a fused step, and a training forward through BatchNorm
    assert (weight._version, mean._version) == before[:2], "PyTorch bumps these now: WriteWatch may be redundant"
    assert not torch.equal(weight, before[2]) and not torch.equal(mean, before[3])

    tracker, index = ChangeTracker(), {}
    save(tracker, store, training_state(net, opt), "run/0.manifest", index)
    step(net, opt)
    blind = tracker.snapshot(training_state(net, opt))
    assert "state_dict.head.weight" not in copied_names(blind)  # the version counter did not see the fused step
    verified = tracker.snapshot(training_state(net, opt), verify=True)
    assert {"state_dict.head.weight", "state_dict.body.1.running_mean"} <= set(verified.suspects)
    store.write(verified, "run/1.manifest", index=index)
    assert same(store.load("run/1.manifest"), training_state(net, opt))

    watch = watch_untracked_writes(net, [opt])
    version = (weight._version, mean._version)
    step(net, opt)
    assert (weight._version, mean._version) == version  # noted only: a bump here would break BatchNorm's backward
    watch.bump()
    assert weight._version > version[0] and mean._version > version[1]
    watch.remove()
    version = (weight._version, mean._version)
    step(net, opt)
    watch.bump()
    assert (weight._version, mean._version) == version


def copied_names(snap: Snapshot) -> set[str]:
    return {".".join(map(str, p)) for p, s in snap.tensors if s.copy is not None and s.blob is None}


@pytest.mark.parametrize("write", ["p.data.mul_", "numpy view"])
def test_writes_past_the_version_counter_are_caught_by_a_verifying_snapshot(store: BlobStore, write: str) -> None:
    net = Net()
    tracker, index = ChangeTracker(), {}
    state = {"state_dict": net.state_dict()}
    save(tracker, store, state, "run/0.manifest", index)
    if write == "p.data.mul_":
        net.head.weight.data.mul_(3)
    else:
        net.head.weight.detach().numpy()[0, 0] = 42.0
    blind = tracker.snapshot({"state_dict": net.state_dict()})
    assert blind.reused == len(blind.tensors)  # the documented limit: not seen without reading
    verified = tracker.snapshot({"state_dict": net.state_dict()}, verify=True)
    assert verified.suspects == ("state_dict.head.weight",) and tracker.untrusted == ["state_dict.head.weight"]
    index.update(store.write(verified, "run/1.manifest", index=index).new_blobs)
    assert same(store.load("run/1.manifest"), {"state_dict": net.state_dict()})
    later = tracker.snapshot({"state_dict": net.state_dict()})  # no longer trusted: copied (then deduplicated)
    assert copied_names(later) == {"state_dict.head.weight"}
    assert store.write(later, "run/2.manifest", index=index).pack is None


def test_a_verifying_snapshot_finds_nothing_when_nothing_was_written_unseen(store: BlobStore) -> None:
    net = Net()
    opt = torch.optim.Adam(net.parameters(), fused=True)
    tracker, index = ChangeTracker(watch=watch_untracked_writes(net, [opt])), {}
    for epoch in range(3):
        step(net, opt)
        snap = tracker.snapshot(training_state(net, opt), verify=epoch == 2)
        store.write(snap, f"run/{epoch}.manifest", index=index)
    assert snap.suspects == () and tracker.untrusted == []


def test_a_verifying_snapshot_while_the_previous_write_is_pending_compares_with_its_copy() -> None:
    tracker = ChangeTracker()
    state = {"w": torch.randn(16)}
    tracker.snapshot(state)  # never written: its slots still hold their copies
    state["w"].data.add_(1)
    snap = tracker.snapshot(state, verify=True)
    assert snap.suspects == ("w",)


def test_a_tensor_replaced_by_another_of_the_same_shape_is_changed(store: BlobStore) -> None:
    tracker, index = ChangeTracker(), {}
    state = {"buffer": torch.zeros(100_000)}
    save(tracker, store, state, "run/0.manifest", index)
    del state["buffer"]  # freed but for the tracker's reference: malloc would hand the new tensor its memory
    state["buffer"] = torch.ones(100_000)  # a new tensor at version 0, as the old one was
    snap = tracker.snapshot(state)
    assert copied_names(snap) == {"buffer"}
    store.write(snap, "run/1.manifest", index=index)
    assert same(store.load("run/1.manifest"), state)


def test_tensors_without_a_version_counter_are_always_copied() -> None:
    with torch.inference_mode():
        frozen = torch.ones(4)
    tracker = ChangeTracker()
    tracker.snapshot({"t": frozen})
    assert tracker.snapshot({"t": frozen}).copied == 1


# ---- integrity ------------------------------------------------------------------------------------------------------


def classifier_state() -> dict[str, Any]:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    return {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 0}


def test_a_corrupt_blob_is_named_by_checkpoint_and_tensor(local: BlobStore) -> None:
    state = classifier_state()
    written = save(ChangeTracker(), local, state, "run/epoch=0.manifest", {})
    pack = Path(local.root, str(written.pack))
    data = bytearray(pack.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, then the bytes
    _, end = json.loads(data[8:header])[content_hash(state["state_dict"]["net.0.weight"])]["data_offsets"]
    data[header + end - 1] ^= 0x01  # one flipped bit in the weight's last byte
    pack.write_bytes(bytes(data))
    with pytest.raises(BlobError, match=r"'run/epoch=0.manifest': tensor 'state_dict.net.0.weight' is corrupt") as e:
        local.load("run/epoch=0.manifest")
    assert (e.value.checkpoint, e.value.tensor) == ("run/epoch=0.manifest", "state_dict.net.0.weight")
    assert isinstance(e.value, CheckpointError)


def test_a_missing_pack_is_named_by_checkpoint_and_tensor(store: BlobStore) -> None:
    written = save(ChangeTracker(), store, classifier_state(), "run/epoch=0.manifest", {})
    store.fs.rm(f"{store.root}/{written.pack}")
    with pytest.raises(BlobError, match=r"tensor 'state_dict.net.0.weight' is in pack 'packs/.*', which is missing"):
        store.load("run/epoch=0.manifest")


def test_a_blob_missing_from_its_pack_is_named(local: BlobStore) -> None:
    state = classifier_state()
    written = save(ChangeTracker(), local, state, "run/epoch=0.manifest", {})
    import safetensors.torch

    pack = str(Path(local.root, str(written.pack)))
    blobs = safetensors.torch.load_file(pack)
    del blobs[content_hash(state["state_dict"]["net.2.bias"])]
    safetensors.torch.save_file(blobs, pack)
    with pytest.raises(BlobError, match=r"tensor 'state_dict.net.2.bias' is missing from pack"):
        local.load("run/epoch=0.manifest")


def test_a_missing_or_foreign_manifest_is_a_checkpoint_error(store: BlobStore) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint 'run/none.manifest' is missing"):
        store.load("run/none.manifest")
    store.fs.makedirs(f"{store.root}/run", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/run/junk.manifest", b"not a manifest")
    with pytest.raises(CheckpointError, match=r"'run/junk.manifest' cannot be read as a flor manifest"):
        store.load("run/junk.manifest")
    buf = io.BytesIO()
    torch.save({"state_dict": {}}, buf)  # a plain Lightning-style checkpoint
    store.fs.pipe_file(f"{store.root}/run/ckpt.manifest", buf.getvalue())
    with pytest.raises(CheckpointError, match=r"is not a flor manifest: expected format 'flor-manifest/1', got None"):
        store.load("run/ckpt.manifest")


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_a_manifest_that_would_run_code_is_refused_without_running_it(local: BlobStore, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"format": "flor-manifest/1", "state": _Payload(str(marker)), "tensors": []}, buf)
    Path(local.root, "run").mkdir(parents=True)
    Path(local.root, "run/evil.manifest").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="cannot be read as a flor manifest"):
        local.load("run/evil.manifest")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()  # the payload does run when unpickled freely
    assert marker.exists()


class FailingRename(MemoryFileSystem):
    """A memory filesystem whose renames onto names containing ``fail`` raise, as a full disk would."""

    cachable = False  # fsspec would hand out one instance per argument list

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail

    def mv(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        if self.fail in path2:
            raise OSError(28, "No space left on device")
        super().mv(path1, path2, *args, **kwargs)


def test_a_failed_pack_write_leaves_nothing_and_the_next_write_stores_its_blobs() -> None:
    root = f"/blobs-{uuid.uuid4().hex}"
    broken, fine = BlobStore(FailingRename("packs/"), root), BlobStore(fsspec.filesystem("memory"), root)
    tracker, state = ChangeTracker(), {"w": torch.randn(64), "epoch": 0}
    with pytest.raises(OSError, match="No space left"):
        broken.write(tracker.snapshot(state), "run/0.manifest", index={})
    assert fine.fs.find(root) == []  # no pack, no manifest, no temporary file
    state["epoch"] = 1
    snap = tracker.snapshot(state)  # w unchanged: reused, and its copy is still waiting to be written
    assert snap.reused == 1
    written = fine.write(snap, "run/1.manifest", index={})
    assert written.pack is not None and same(fine.load("run/1.manifest"), state)


def test_a_failed_manifest_write_leaves_no_manifest_and_its_pack_serves_the_next_one() -> None:
    root = f"/blobs-{uuid.uuid4().hex}"
    broken, fine = BlobStore(FailingRename(".manifest"), root), BlobStore(fsspec.filesystem("memory"), root)
    tracker, state = ChangeTracker(), {"w": torch.randn(64), "epoch": 0}
    with pytest.raises(OSError, match="No space left"):
        broken.write(tracker.snapshot(state), "run/0.manifest", index={})
    assert fine.manifests() == [] and len(fine.packs()) == 1
    assert [p for p in fine.fs.find(root) if ".tmp-" in p] == []
    state["epoch"] = 1
    written = fine.write(tracker.snapshot(state), "run/1.manifest", index={})
    assert written.pack is None and fine.read_manifest("run/1.manifest").packs == set(fine.packs())
    assert same(fine.load("run/1.manifest"), state)


# ---- loading --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_a_local_pack_is_mapped_not_read_and_writes_to_loaded_tensors_stay_private(local: BlobStore) -> None:
    state = {"w": torch.randn(256, 256)}
    written = save(ChangeTracker(), local, state, "run/0.manifest", {})
    pack = str(Path(local.root, str(written.pack)))
    loaded = local.load("run/0.manifest")
    assert pack in Path("/proc/self/maps").read_text()
    loaded["w"].add_(1)  # an optimizer stepping restored state in place
    assert same(local.load("run/0.manifest"), state)  # the pack is untouched: it still verifies


def test_a_remote_pack_is_read_once_per_load() -> None:
    class Counting(MemoryFileSystem):
        cachable = False

        def __init__(self) -> None:
            super().__init__()
            self.reads: list[str] = []

        def cat_file(self, path: str, *args: Any, **kwargs: Any) -> bytes:
            self.reads.append(path)
            return bytes(super().cat_file(path, *args, **kwargs))

    store = BlobStore(Counting(), f"/blobs-{uuid.uuid4().hex}")
    state = {f"w{i}": torch.randn(32) for i in range(6)}
    written = save(ChangeTracker(), store, state, "run/0.manifest", {})
    assert same(store.load("run/0.manifest"), state)
    reads = store.fs.reads  # type: ignore[attr-defined]
    assert reads == [f"{store.root}/run/0.manifest", f"{store.root}/{written.pack}"]


# ---- gc and push ----------------------------------------------------------------------------------------------------


def test_deletable_packs_are_those_no_kept_checkpoint_references() -> None:
    packs = ["packs/a", "packs/b", "packs/c", "packs/orphan"]
    kept = [frozenset({"packs/a"}), frozenset({"packs/a", "packs/c"})]
    assert deletable_packs(packs, kept) == ["packs/b", "packs/orphan"]
    assert deletable_packs(packs, []) == sorted(packs)
    assert deletable_packs([], kept) == []


def test_push_moves_each_manifest_after_its_packs_and_resumes_where_it_stopped() -> None:
    manifests = {"r2/0.manifest": {"packs/a", "packs/c"}, "r1/0.manifest": {"packs/a"}, "r1/1.manifest": {"packs/b"}}
    plan = push_plan(manifests, remote=set())
    assert plan == ["packs/a", "r1/0.manifest", "packs/b", "r1/1.manifest", "packs/c", "r2/0.manifest"]
    for cut in range(len(plan) + 1):  # stopped after `cut` objects, then planned again
        assert push_plan(manifests, remote=set(plan[:cut])) == plan[cut:]
    assert push_plan(manifests, remote={"packs/c"}) == [o for o in plan if o != "packs/c"]


def two_runs_sharing_a_backbone(store: BlobStore) -> dict[str, dict[str, Any]]:
    """Two fine-tunes of one backbone, two checkpoints each; returns each checkpoint's state."""
    backbone = {f"layer{i}": torch.randn(32, 32) for i in range(3)}
    states: dict[str, dict[str, Any]] = {}
    for run in ("a", "b"):
        tracker, index = ChangeTracker(), store.rebuild_index()
        state = {"backbone": {k: v.clone() for k, v in backbone.items()}, "head": torch.randn(4, 32), "epoch": 0}
        for epoch in range(2):
            state["head"].add_(1)
            state["epoch"] = epoch
            save(tracker, store, state, f"{run}/{epoch}.manifest", index)
            states[f"{run}/{epoch}.manifest"] = load_copy(state)
    return states


def load_copy(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    return dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


def test_gc_deletes_only_packs_no_kept_checkpoint_references(store: BlobStore) -> None:
    states = two_runs_sharing_a_backbone(store)
    kept = ["b/1.manifest"]  # run a is dropped, and b's first epoch
    doomed = deletable_packs(store.packs(), [store.read_manifest(m).packs for m in kept])
    packs = {name: store.read_manifest(name).packs for name in states}
    assert len(store.packs()) == 4  # a/0: backbone and head; then one head each
    assert set(doomed) == (packs["a/1.manifest"] | packs["b/0.manifest"]) - packs["b/1.manifest"]
    assert len(doomed) == 2 and packs["a/0.manifest"] < packs["b/1.manifest"]  # a's first pack: b's backbone
    for pack in doomed:
        store.fs.rm(f"{store.root}/{pack}")
    for name in kept:
        assert same(store.load(name), states[name])


def test_a_push_stopped_anywhere_leaves_every_checkpoint_loadable(local: BlobStore) -> None:
    states = two_runs_sharing_a_backbone(local)
    remote = BlobStore(fsspec.filesystem("memory"), f"/remote-{uuid.uuid4().hex}")
    manifests = {name: local.read_manifest(name).packs for name in local.manifests()}
    plan = push_plan({n: p for n, p in manifests.items() if n.startswith("a/")}, remote=set())
    assert plan[-1] == "a/1.manifest"

    def resolve(name: str) -> str:  # where the caller's index says an object lies now
        here = f"{local.root}/{name}"
        return here if Path(here).exists() else f"memory://{remote.root}/{name}"

    for obj in plan:  # move one object (copy, then delete here), then check every checkpoint
        remote.fs.makedirs(f"{remote.root}/{obj}".rsplit("/", 1)[0], exist_ok=True)
        remote.fs.pipe_file(f"{remote.root}/{obj}", Path(local.root, obj).read_bytes())
        Path(local.root, obj).unlink()
        for name, state in states.items():
            assert same(local.load(name, resolve=resolve), state), (obj, name)
    assert [n for n in local.manifests() if n.startswith("a/")] == []


# ---- Lightning ------------------------------------------------------------------------------------------------------


class BlobCheckpointIO(CheckpointIO):
    """Lightning's public plugin API over a BlobStore; also writes each checkpoint with torch.save beside it."""

    def __init__(self, store: BlobStore, reference: Path) -> None:
        self.store, self.reference = store, reference
        self.tracker, self.index = ChangeTracker(), store.rebuild_index()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        torch.save(checkpoint, self.reference)
        self.index.update(self.store.write(self.tracker.snapshot(checkpoint), str(path), index=self.index).new_blobs)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        return self.store.load(str(path))

    def remove_checkpoint(self, path: Any) -> None:
        raise NotImplementedError


@pytest.mark.integration
def test_lightning_resumes_from_a_blob_checkpoint_as_from_its_torch_save_twin(local: BlobStore, tmp_path: Path) -> None:
    reference = tmp_path / "epoch=1.ckpt"
    L.seed_everything(0)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2), plugins=[BlobCheckpointIO(local, reference)])
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    trainer.save_checkpoint("run/epoch=1.manifest")
    assert same(local.load("run/epoch=1.manifest"), torch.load(reference, weights_only=True))

    def resume(ckpt_path: str, plugins: list[Any]) -> dict[str, torch.Tensor]:  # epochs 2 and 3, seeded alike
        L.seed_everything(1)
        model = DigitsClassifier()
        L.Trainer(**trainer_kwargs(max_epochs=4), plugins=plugins).fit(
            model, datamodule=DigitsData(), ckpt_path=ckpt_path
        )
        return model.state_dict()

    from_blobs = resume("run/epoch=1.manifest", [BlobCheckpointIO(local, tmp_path / "unused.ckpt")])
    assert same(from_blobs, resume(str(reference), []))


# ---- SIGKILL at random moments --------------------------------------------------------------------------------------

KILLS = 12
SEED = 20261130
TENSORS = 6
CHECKPOINTS = 15  # per child, then it idles until it is killed
# The kill is timed on the child's clock: a killer process, started with the child, waits for a moment on the
# system's monotonic clock, then sends SIGKILL. (Aimed from the test process, or by a process started at the moment,
# kills landed tens of ms late on this busy machine, mostly after the write; a thread in the child could not run
# while the writer held the GIL.)
KILLER = (
    "import os, sys, time; t = float(sys.stdin.readline()); "
    "time.sleep(max(0, t - time.monotonic())); os.kill(int(sys.argv[1]), 9)"
)
CHILD = f"""\
import os, subprocess, sys, time
import fsspec, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_blobs import kill_state, kill_mutate
from flor_lightning._blobs import BlobStore, ChangeTracker

root, run, mode, k, fraction = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
killer = subprocess.Popen([sys.executable, "-S", "-c", {KILLER!r}, str(os.getpid())], stdin=subprocess.PIPE, text=True)

def kill_in(seconds):
    killer.stdin.write(f"{{time.monotonic() + seconds}}\\n")
    killer.stdin.flush()

if mode == "anytime":  # start-up, indexing, snapshots, writes, training: whatever runs then
    kill_in(fraction * 1.5)
store = BlobStore(fsspec.filesystem("file"), root)
index = store.rebuild_index()
state, tracker, spans = kill_state(), ChangeTracker(), []
for n in range({CHECKPOINTS}):
    kill_mutate(state, n)
    snap = tracker.snapshot(state)
    print(f"begin {{n}}", flush=True)
    start = time.monotonic()
    if mode == "write" and n == k:  # a fraction of the way into this write, as long as this child's writes took
        kill_in(fraction * sorted(spans)[len(spans) // 2])
    index.update(store.write(snap, f"{{run}}/{{n:04d}}.manifest", index=index).new_blobs)
    spans.append(time.monotonic() - start)
    print(f"end {{n}}", flush=True)
    time.sleep(0.03)  # training
time.sleep(600)
"""


def kill_state() -> dict[str, Any]:
    """What each killed child checkpoints: the same initial tensors in every child, so runs share blobs."""
    g = torch.Generator().manual_seed(0)
    return {"w": [torch.randn(1024, 1024, generator=g) for _ in range(TENSORS)], "n": -1}


def kill_mutate(state: dict[str, Any], n: int) -> None:
    for i in (n, n + 2, n + 4):  # half the tensors change: 12 MB new per checkpoint
        state["w"][i % TENSORS].add_(1.0)
    state["n"] = n


def run_killed(root: str, run: str, mode: str, k: int, fraction: float) -> list[str]:
    """Run a child that writes checkpoints until it kills itself; its events."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, root, run, mode, str(k), str(fraction)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, f"the child was not killed: {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout.split("\n")


def check_run(store: BlobStore, run: str, events: list[str], before: set[str]) -> str:
    """Every manifest of ``run`` loads, every blob verified, with the state it had; returns where the kill landed.

    Later children only add files, so a run checked after its own kill stays checked.
    """
    ended = {int(e.split()[1]) for e in events if e.startswith("end")}
    begun = {int(e.split()[1]) for e in events if e.startswith("begin")}
    names = [m for m in store.manifests() if m.startswith(f"{run}/")]
    found = {int(m.split("/")[1].split(".")[0]) for m in names}
    assert ended <= found <= begun, (ended, found, begun)
    expected = kill_state()
    for n in range(max(found, default=-1) + 1):
        kill_mutate(expected, n)
        if n in found:
            assert same(store.load(f"{run}/{n:04d}.manifest"), expected)
    new = {p.removeprefix(f"{store.root}/") for p in store.fs.find(store.root)} - before
    leftovers = {p for p in new if ".tmp-" in p}
    if begun == ended:
        assert not leftovers, leftovers
        return "outside a write"
    assert len(leftovers) <= 2, leftovers  # only the interrupted pack and manifest
    referenced = {p for m in store.manifests() for p in store.read_manifest(m).packs}
    if max(begun) in found:
        return "after the manifest's rename"
    if any(p.endswith(".manifest.tmp-") or ".manifest.tmp-" in p for p in leftovers):
        return "writing the manifest"
    if {p for p in new if p.startswith("packs/") and ".tmp-" not in p} - referenced:
        return "between the pack's rename and the manifest"
    return "writing the pack" if leftovers else "hashing"


@pytest.mark.integration
def test_sigkill_at_random_moments_leaves_no_manifest_naming_a_missing_blob(tmp_path: Path) -> None:
    """Twelve writer processes on one root, each killed with SIGKILL: a quarter at any moment, the rest a random
    fraction into a random write. After each kill every manifest of that run loads, every blob verified, with the
    state it had; leftovers are at most the interrupted write's two temporary files. Where the kills landed is
    counted, so the test knows it reached the window between a pack's rename and its manifest's."""
    store = BlobStore(fsspec.filesystem("file"), str(tmp_path / "ckpt"))
    rng = random.Random(SEED)
    landed: Counter[str] = Counter()
    reused_runs = 0
    for i in range(KILLS):
        before = {p.removeprefix(f"{store.root}/") for p in store.fs.find(store.root)}
        mode = "anytime" if i % 4 == 0 else "write"
        events = run_killed(store.root, f"run{i}", mode, rng.randrange(1, CHECKPOINTS), rng.random())
        landed[check_run(store, f"run{i}", events, before)] += 1
        # the state of every child's first checkpoint is the same: a later child stores nothing new for it
        first, earlier = f"run{i}/0000.manifest", [f"run{j}/0000.manifest" for j in range(i)]
        if first in store.manifests() and set(earlier) & set(store.manifests()):
            assert store.read_manifest(first).packs <= {p for p in before if p.startswith("packs/")}
            reused_runs += 1
    print(dict(landed))
    assert KILLS - landed["outside a write"] >= KILLS // 3, landed
    assert landed["between the pack's rename and the manifest"] + landed["writing the manifest"] >= 1, landed
    assert reused_runs >= KILLS // 3, reused_runs


@pytest.mark.integration
def test_the_blob_store_benchmark_runs_in_smoke_mode() -> None:
    """benchmarks/blob_store.py end to end on a tiny state; its numbers are not asserted (not a timed test)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "blob_store.py"), "--smoke"],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for row in ("| c1 first (all new) | today |", "| c3 frozen backbone (head) | blobs |", "| BlobStore.load (mmap"):
        assert row in done.stdout
