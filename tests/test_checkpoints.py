"""The checkpoint store (manifests and blobs): unit tests on ``memory://`` and a local folder, then a real Trainer."""

from __future__ import annotations

import enum
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import rows, sha256
from models import TRAIN_BATCHES, DigitsClassifier, DigitsData, trainer_kwargs
from torch.nn import functional as F

import flor_lightning as flor
from flor_lightning import _rng as rng
from flor_lightning._checkpoints import CheckpointInfo, CheckpointStore, snapshot, write_old
from flor_lightning._errors import BlobError, CheckpointError, ConfigError


@pytest.fixture(params=["memory", "local"])
def ckpts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    url = f"memory://flor-test-{uuid.uuid4().hex}" if request.param == "memory" else str(tmp_path / "ckpts")
    store = CheckpointStore(url)
    yield store
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def save(store: CheckpointStore, state: Any, epoch: int = 3, run_id: str = "run-a") -> CheckpointInfo:
    done: list[CheckpointInfo] = []
    store.save(store.snapshot(state), run_id, epoch, epoch * 10, done.append)
    store.wait()
    assert len(done) == 1
    return done[0]


def test_write_seconds_are_timed_with_the_injected_clock(tmp_path: Path) -> None:
    writer_ticks = iter(range(100))

    def clock() -> float:  # a quarter second per reading on the writer thread; the waiting thread reads 0
        return 0.25 * next(writer_ticks) if threading.current_thread().name == "flor-checkpoint-writer" else 0.0

    info = save(CheckpointStore(str(tmp_path / "ckpts"), clock=clock), sample_state())
    assert info.write_seconds == 0.25  # the writer read the clock as it began and once the file was in place


def sample_state() -> dict[str, Any]:
    return {
        "state_dict": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "epoch": 3,
        "name": "run",
        "flags": (True, None, b"raw"),
    }


def test_save_then_load_round_trips_as_data(ckpts: CheckpointStore) -> None:
    state = sample_state()

    info = save(ckpts, state)

    assert info.path == ckpts.path("run-a", 3)
    assert info.path.endswith("/run-a/epoch=00003.manifest")
    assert info.format == "flor-manifest/1" and len(info.packs) == 1
    assert (info.epoch, info.step) == (3, 30)
    loaded = ckpts.load(info.path, info.sha256)
    torch.testing.assert_close(loaded["state_dict"], state["state_dict"], rtol=0, atol=0)
    assert loaded["optimizer_states"][0]["param_groups"] == state["optimizer_states"][0]["param_groups"]
    assert loaded["optimizer_states"][0]["state"][0]["step"].item() == 4.0
    assert (loaded["epoch"], loaded["name"], loaded["flags"]) == (3, "run", (True, None, b"raw"))


def test_read_state_gives_the_plain_data_without_reading_a_tensor(ckpts: CheckpointStore) -> None:
    info = save(ckpts, sample_state())
    for pack in info.packs:  # not even the packs are needed
        ckpts.fs.rm(f"{ckpts.root}/{pack}")

    state = ckpts.read_state(info.path, info.sha256)

    assert (state["epoch"], state["name"], state["flags"]) == (3, "run", (True, None, b"raw"))
    assert state["optimizer_states"][0]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpts.read_state(info.path, "0" * 64)


def test_writer_counts_what_it_wrote(ckpts: CheckpointStore) -> None:
    first, second = save(ckpts, sample_state(), epoch=0), save(ckpts, sample_state(), epoch=1)

    assert ckpts.written == 2
    assert ckpts.bytes_written == first.size + second.size
    assert ckpts.last_write_cpu_seconds is not None
    assert 0 < ckpts.last_write_cpu_seconds <= ckpts.writer_cpu_seconds


def test_recorded_checksum_is_the_manifest_s_and_size_what_the_checkpoint_added(ckpts: CheckpointStore) -> None:
    info = save(ckpts, sample_state())

    data = ckpts.fs.cat_file(info.path)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    (pack,) = info.packs
    assert info.size == len(data) + ckpts.fs.size(f"{ckpts.root}/{pack}")


def test_unchanged_tensors_are_not_written_again(ckpts: CheckpointStore) -> None:
    state = sample_state()
    first = save(ckpts, state, epoch=0)
    state["state_dict"]["b"].add_(1)  # one tensor changes in place; the others stay as they were
    second = save(ckpts, state, epoch=1)

    assert ckpts.snapshot(state).reused == 3  # w, b (unchanged since) and the optimizer's step
    assert len(second.packs) == 2 and set(first.packs) < set(second.packs)  # w and step stay in the first pack
    assert second.size < first.size
    torch.testing.assert_close(ckpts.load(second.path, second.sha256)["state_dict"], state["state_dict"])


def test_a_second_run_under_the_root_reuses_the_blobs_of_the_first(ckpts: CheckpointStore) -> None:
    first = save(ckpts, sample_state(), run_id="run-a")
    other = CheckpointStore(ckpts.url)  # another process's store: it learns the root's blobs from the packs
    second = save(other, sample_state(), run_id="run-b")

    assert second.packs == first.packs  # nothing new: only the manifest was written
    assert second.size == len(ckpts.fs.cat_file(second.path))


def test_no_temporary_file_is_left_after_a_save(ckpts: CheckpointStore) -> None:
    save(ckpts, sample_state(), epoch=0)
    save(ckpts, sample_state(), epoch=1)

    names = sorted(p.removeprefix(ckpts.root + "/") for p in ckpts.fs.find(ckpts.root))
    assert [n for n in names if not n.startswith("packs/")] == [
        "run-a/epoch=00000.manifest",
        "run-a/epoch=00001.manifest",
    ]
    assert len([n for n in names if n.startswith("packs/")]) == 1  # the second checkpoint's blobs were known


def test_a_flipped_byte_is_detected(ckpts: CheckpointStore) -> None:
    info = save(ckpts, sample_state())
    data = bytearray(ckpts.fs.cat_file(info.path))
    data[len(data) // 2] ^= 0xFF
    ckpts.fs.pipe_file(info.path, bytes(data))

    with pytest.raises(CheckpointError, match="corrupt") as err:
        ckpts.load(info.path, info.sha256)
    assert "run-a/epoch=00003.manifest" in str(err.value)


def test_a_flipped_byte_in_a_blob_names_the_checkpoint_and_the_tensor(ckpts: CheckpointStore) -> None:
    info = save(ckpts, {"state_dict": {"w": torch.arange(1000, dtype=torch.float32)}})
    pack = f"{ckpts.root}/{info.packs[0]}"
    data = bytearray(ckpts.fs.cat_file(pack))
    data[-7] ^= 0xFF  # inside w's bytes
    ckpts.fs.pipe_file(pack, bytes(data))

    with pytest.raises(BlobError, match="corrupt") as err:
        ckpts.load(info.path, info.sha256)
    assert (err.value.checkpoint, err.value.tensor) == ("run-a/epoch=00003.manifest", "state_dict.w")


def test_a_missing_pack_names_the_checkpoint_and_the_tensor(ckpts: CheckpointStore) -> None:
    info = save(ckpts, {"state_dict": {"w": torch.ones(3)}})
    ckpts.fs.rm(f"{ckpts.root}/{info.packs[0]}")

    with pytest.raises(BlobError, match="missing or unreadable") as err:
        ckpts.load(info.path, info.sha256)
    assert (err.value.checkpoint, err.value.tensor) == ("run-a/epoch=00003.manifest", "state_dict.w")


def test_a_truncated_manifest_is_detected(ckpts: CheckpointStore) -> None:
    info = save(ckpts, sample_state())
    data = ckpts.fs.cat_file(info.path)
    ckpts.fs.pipe_file(info.path, data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="corrupt") as err:
        ckpts.load(info.path, info.sha256)
    assert "run-a/epoch=00003.manifest" in str(err.value)
    # without a checksum to compare, the reader still refuses it instead of returning garbage
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        ckpts.load(info.path, None)
    assert "run-a/epoch=00003.manifest" in str(err.value)


def test_a_missing_file_is_named(ckpts: CheckpointStore) -> None:
    path = ckpts.path("run-a", 9)
    with pytest.raises(CheckpointError, match="missing") as err:
        ckpts.load(path, None)
    assert "run-a/epoch=00009.manifest" in str(err.value)


def test_an_old_ckpt_file_still_loads_and_is_verified(ckpts: CheckpointStore) -> None:
    """Runs recorded before manifests: one torch.save file, its sha256 in the index."""
    path = f"{ckpts.root}/run-old/epoch=00000.ckpt"
    digest, size = write_old(ckpts.fs, path, snapshot(sample_state()))
    assert size == ckpts.fs.size(path)

    loaded = ckpts.load(path, digest)
    torch.testing.assert_close(loaded["state_dict"], sample_state()["state_dict"], rtol=0, atol=0)
    data = bytearray(ckpts.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    ckpts.fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpts.load(path, digest)


def test_a_failed_write_leaves_nothing_and_is_raised_once(ckpts: CheckpointStore) -> None:
    done: list[CheckpointInfo] = []
    ckpts.save({"not data": lambda: None}, "run-a", 0, 0, done.append)  # type: ignore[arg-type]  # no snapshot

    with pytest.raises(CheckpointError, match=r"writing the checkpoint of epoch 0 under .* failed"):
        ckpts.wait()

    assert done == []
    assert not ckpts.fs.exists(ckpts.root) or ckpts.fs.find(ckpts.root) == []
    ckpts.wait()  # the error was reported; the store is usable again
    assert save(ckpts, sample_state(), epoch=1).epoch == 1


def test_check_writable(ckpts: CheckpointStore, tmp_path: Path) -> None:
    ckpts.check_writable(f"{ckpts.root}/run-a")
    assert ckpts.fs.find(ckpts.root) == []  # the probe is removed

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="cannot write checkpoints"):
        CheckpointStore(str(a_file)).check_writable(f"{a_file}/run-a")


def test_snapshot_is_a_copy() -> None:
    weights = torch.ones(3)
    nested = [torch.zeros(2), (torch.arange(3),)]
    state = {"w": weights, "nested": nested, "view": weights[1:]}

    copy = snapshot(state)
    weights.add_(5)
    nested[0].fill_(7)
    nested[1][0].mul_(0)

    assert torch.equal(copy["w"], torch.ones(3))
    assert torch.equal(copy["view"], torch.ones(2))
    assert torch.equal(copy["nested"][0], torch.zeros(2))
    assert torch.equal(copy["nested"][1][0], torch.arange(3))
    assert isinstance(copy["nested"], list)
    assert isinstance(copy["nested"][1], tuple)
    assert copy["w"].data_ptr() != weights.data_ptr()


class Color(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    MAX = "max"


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


def test_snapshot_keeps_checkpoints_loadable_as_data(ckpts: CheckpointStore) -> None:
    state = {
        "object": Opaque(),
        "set": {1},
        "array": np.zeros(2),
        "np_float64": np.float64(0.25),  # a float subclass
        "np_float32": np.float32(0.5),
        "np_int": np.int64(7),
        "int_enum": Color.RED,
        "str_enum": Mode.MAX,
        "size": torch.Size([2, 3]),
    }

    info = save(ckpts, state)
    loaded = ckpts.load(info.path, info.sha256)  # weights_only=True

    assert loaded["object"] == "Opaque()"
    assert loaded["set"] == "{1}"
    assert loaded["array"] == repr(np.zeros(2))
    assert (loaded["np_float64"], type(loaded["np_float64"])) == (0.25, float)
    assert (loaded["np_float32"], type(loaded["np_float32"])) == (0.5, float)
    assert (loaded["np_int"], type(loaded["np_int"])) == (7, int)
    assert (loaded["int_enum"], type(loaded["int_enum"])) == (1, int)
    assert (loaded["str_enum"], type(loaded["str_enum"])) == ("max", str)
    assert loaded["size"] == (2, 3)


# ---- with a real Trainer -------------------------------------------------------------------------


def expected_epochs(max_epochs: int, every: int) -> set[int]:
    """Checkpoint -1 (the initial state), every ``every``-th epoch, and the last one."""
    return {-1} | {e for e in range(max_epochs) if (e + 1) % every == 0} | {max_epochs - 1}


def record(**overrides: Any) -> flor.FlorCallback:
    callback = flor.FlorCallback(checkpoint_every=overrides.pop("checkpoint_every", 1))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs(**overrides))
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return callback


@pytest.mark.integration
@pytest.mark.parametrize(("max_epochs", "every"), [(3, 1), (3, 2), (4, 2), (5, 3)])
def test_checkpoints_taken_and_indexed(project: Path, flor_home: Path, max_epochs: int, every: int) -> None:
    callback = record(max_epochs=max_epochs, checkpoint_every=every)

    indexed = rows(project / ".flor" / "flor.db", "SELECT * FROM checkpoints ORDER BY epoch")
    assert {r["epoch"] for r in indexed} == expected_epochs(max_epochs, every)
    folder = flor_home / "proj" / str(callback.run_id)
    names = {
        r["epoch"]: "initial.manifest" if r["epoch"] == -1 else f"epoch={r['epoch']:05d}.manifest" for r in indexed
    }
    assert sorted(p.name for p in folder.iterdir()) == sorted(names.values())
    packs = flor_home / "proj"
    for row in indexed:
        path = Path(row["path"])
        assert path == folder / names[row["epoch"]]
        assert row["run_id"] == callback.run_id
        assert row["sha256"] == sha256(path)
        assert row["format"] == "flor-manifest/1"
        referenced = json.loads(row["packs"])
        assert referenced and all((packs / p).is_file() for p in referenced)
        assert row["step"] == (row["epoch"] + 1) * TRAIN_BATCHES
    # what the checkpoints added is what lies on disk: every manifest and every pack, each once
    on_disk = sum(p.stat().st_size for p in packs.rglob("*") if p.is_file())
    assert sum(r["size"] for r in indexed) == on_disk


@pytest.mark.integration
def test_checkpoint_holds_the_full_training_state(project: Path) -> None:
    callback = record(max_epochs=2)
    row = rows(project / ".flor" / "flor.db", "SELECT path, sha256 FROM checkpoints WHERE epoch = 1")[0]

    state = CheckpointStore(str(Path(row["path"]).parent)).load(row["path"], row["sha256"])

    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "flor"} <= set(state)
    assert (state["epoch"], state["global_step"]) == (2, 2 * TRAIN_BATCHES)  # as epoch 2 would begin
    assert state["flor"]["run_id"] == callback.run_id
    assert set(state["flor"]["rng"]) >= {"python", "numpy", "torch"}
    assert "hyper_parameters" not in state  # kept in the log store instead: a checkpoint is data


@pytest.mark.integration
def test_restored_checkpoint_reproduces_the_next_epoch_bit_for_bit(project: Path) -> None:
    """The checkpoint of epoch 0 (taken as epoch 1 starts) plus its RNG state re-derives epoch 1 exactly."""
    record(max_epochs=3, limit_train_batches=6)  # shuffled data, dropout, Adam, StepLR
    recorded = flor.records("train_loss")
    recorded = recorded[recorded["level"] == "step"]
    epoch1 = recorded[recorded["epoch"] == 1]["value"].tolist()
    assert len(epoch1) == 6
    row = rows(project / ".flor" / "flor.db", "SELECT path, sha256 FROM checkpoints WHERE epoch = 0")[0]
    state = CheckpointStore(str(Path(row["path"]).parent)).load(row["path"], row["sha256"])

    L.seed_everything(12345, verbose=False)  # whatever the generators hold now must not matter
    model = DigitsClassifier()
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer_states"][0])
    scheduler.load_state_dict(state["lr_schedulers"][0])
    data = DigitsData()
    data.setup("fit")
    model.train()
    rng.restore(state["flor"]["rng"])

    losses = []
    # range first, so zip stops without drawing a 7th batch (drawing one would not use the RNG anyway)
    for _, (x, y) in zip(range(6), data.train_dataloader(), strict=False):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses == epoch1  # exact float equality, not approx
    assert optimizer.param_groups[0]["lr"] == 0.005  # StepLR's state came back too
