"""A safetensors pack written to a local file with ``O_DIRECT``: the bytes bypass the page cache.

A checkpoint's pack is written once and read again only by a replay. Through the page cache, writing 101 MB cost
the writer thread ~45 ms of CPU to copy the bytes into cache pages, ~10 ms more to drop them again after the fsync
(``posix_fadvise``), and the kernel's flusher threads wrote them back on the same cores as training. With
``O_DIRECT`` the device reads the bytes from one small, page-aligned staging buffer the tensors are copied into
(~15 ms per 101 MB), and nothing is left in the cache to write back or drop.

The file is a plain safetensors file (an 8-byte header length, a JSON header, the tensors' bytes, in the order
safetensors' own writer uses: by item size, largest first, then by name), read with ``safe_open`` like any other;
tests check that safetensors reads back every dtype it is given. Where ``O_DIRECT`` is not available (another OS, a
filesystem such as tmpfs that refuses it) or a dtype has no safetensors name here, :func:`write_direct` returns
False having left nothing, and the caller writes through safetensors.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping

import numpy as np
import torch

_BLOCK = 4096  # O_DIRECT: buffer address, write size and file offset are multiples of the logical block size
_CHUNK = 8 << 20  # the staging buffer

# the dtypes safetensors stores, by their names in its format's specification; other tensors stay in the manifest
DTYPE_NAMES = {
    getattr(torch, name): code
    for name, code in (
        *(("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("int16", "I16"), ("int32", "I32"), ("int64", "I64")),
        *(("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float16", "F16"), ("bfloat16", "BF16")),
        *(("float32", "F32"), ("float64", "F64"), ("complex64", "C64")),
        *(("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")),
    )
    if hasattr(torch, name)
}


def write_direct(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
    """Write ``tensors`` (contiguous CPU tensors) as a safetensors file at ``path``, bypassing the page cache.

    Returns False, with no file at ``path``, where the system or filesystem has no ``O_DIRECT`` or a dtype has no
    safetensors name; other errors (disk full) are raised. The file is not fsynced here (its bytes are on the
    device once each write returns, its size and blocks are metadata that the caller's fsync makes durable).
    """
    if not hasattr(os, "O_DIRECT") or any(t.dtype not in DTYPE_NAMES for t in tensors.values()):
        return False
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    end = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + size]}
        end += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer leaves it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as err:
        if err.errno == errno.EINVAL:  # this filesystem does not do O_DIRECT
            return False
        raise
    try:
        out = _Blocks(fd)
        out.put(np.frombuffer(len(text).to_bytes(8, "little") + text, dtype=np.uint8))
        for key in order:
            out.put(tensors[key].reshape(-1).view(torch.uint8).numpy())
        out.finish()
        os.ftruncate(fd, 8 + len(text) + end)  # the last block was padded: the file ends where the data does
    except OSError as err:
        os.close(fd)
        os.remove(path)
        if err.errno == errno.EINVAL:  # opened, but the filesystem refused a direct write
            return False
        raise
    os.close(fd)
    return True


class _Blocks:
    """Bytes gathered into a page-aligned buffer and written from it in whole blocks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        buffer = np.empty(_CHUNK + _BLOCK, dtype=np.uint8)
        start = -buffer.ctypes.data % _BLOCK
        self.view = buffer[start : start + _CHUNK]
        self.fill = 0

    def put(self, data: np.ndarray) -> None:
        done = 0
        while done < data.size:
            k = min(_CHUNK - self.fill, data.size - done)
            self.view[self.fill : self.fill + k] = data[done : done + k]
            self.fill += k
            done += k
            if self.fill == _CHUNK:
                self._write(_CHUNK)

    def finish(self) -> None:
        """Write what is left, padded with zeros to a whole block."""
        if self.fill:
            padded = self.fill + (-self.fill % _BLOCK)
            self.view[self.fill : padded] = 0
            self._write(padded)

    def _write(self, n: int) -> None:
        view = self.view[:n].data
        while view:
            view = view[os.write(self.fd, view) :]
        self.fill = 0
