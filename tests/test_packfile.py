"""Packs written past the page cache (``O_DIRECT``) are safetensors files that safetensors itself reads back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from flor_lightning import _packfile
from flor_lightning._blobs import _PACKABLE

METADATA = {"format": "flor-pack/1", "hash": "xxh3-128"}


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of each dtype a pack holds, odd sizes (no whole blocks), a scalar and an empty one."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(sorted(_PACKABLE, key=str)):
        raw = torch.randint(0, 256, (3 + 8 * i, 5), dtype=torch.uint8, generator=g)
        out[f"t_{str(dtype).removeprefix('torch.')}"] = raw.view(dtype) if dtype.itemsize == 1 else _bits(raw, dtype)
    out["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["empty"] = torch.zeros(0, 3)
    return out


def _bits(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Random bytes seen as ``dtype`` (NaN payloads included: the bytes, not the values, must survive)."""
    n = raw.numel() - raw.numel() % dtype.itemsize
    return raw.reshape(-1)[:n].view(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    raw = (a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(*raw))


def test_every_dtype_reads_back_through_safetensors(tmp_path: Path) -> None:
    tensors = every_dtype()
    path = tmp_path / "p.safetensors"
    assert _packfile.write_direct(str(path), tensors, METADATA)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == METADATA
        assert set(f.keys()) == set(tensors)
        for key, t in tensors.items():
            assert same_bytes(f.get_tensor(key), t), key
    loaded = safetensors.torch.load(path.read_bytes())
    assert all(same_bytes(loaded[k], t) for k, t in tensors.items())


FLOATS = _packfile._CHUNK // 4  # float32s that fill the staging buffer


@pytest.mark.parametrize("sizes", [[FLOATS], [FLOATS + 1, 3], [5 * FLOATS // 2]])
def test_data_is_byte_for_byte_what_safetensors_writes(tmp_path: Path, sizes: list[int]) -> None:
    """Across the staging buffer's boundaries (a tensor of exactly one buffer, one byte past it, several
    buffers), the tensors' bytes lie in the file in safetensors' own order; only the header's spacing differs."""
    tensors = {f"b{i}": torch.randn(n) for i, n in enumerate(sizes)} | {"half": torch.randn(7).half()}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert _packfile.write_direct(str(ours), tensors, METADATA)
    safetensors.torch.save_file(tensors, str(theirs), metadata=METADATA)

    def split(path: Path) -> tuple[dict[str, object], bytes]:
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]), data[8 + n :]

    (our_header, our_data), (their_header, their_data) = split(ours), split(theirs)
    assert our_header == their_header
    assert our_data == their_data


def test_without_o_direct_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system has no O_DIRECT the caller writes through safetensors: the pack still loads."""
    from fsspec.implementations.local import LocalFileSystem

    from flor_lightning._blobs import BlobStore, ChangeTracker

    monkeypatch.delattr(os, "O_DIRECT")
    assert not _packfile.write_direct(str(tmp_path / "x"), {"a": torch.ones(3)}, METADATA)
    assert not (tmp_path / "x").exists()
    state = {"w": torch.randn(4, 4), "step": 3}
    store = BlobStore(LocalFileSystem(), str(tmp_path / "root"))
    store.write(ChangeTracker().snapshot(state), "run/epoch=00000.manifest", index={})
    back = store.load("run/epoch=00000.manifest")
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
