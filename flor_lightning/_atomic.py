"""Writing a file so that no reader ever sees half of it: the one atomic-write helper.

The checkpoint writer, the blob store and ``flor push`` all write through :func:`atomic`: the
bytes go to a temporary name beside the final one, are made durable, and only then renamed into
place (and the rename made durable); on any error the temporary file is discarded, as fsspec's
transactions do. A process killed at any moment leaves either no file under the final name or
the complete one, plus at most a ``*.tmp-*`` file that :data:`TEMPORARY` matches for clean-up.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

TEMPORARY = "*.tmp-*"
"""A glob for the temporary files an interrupted write leaves (:func:`atomic` names them ``<final>.tmp-<hex>``)."""


@contextlib.contextmanager
def atomic(fs: AbstractFileSystem, final: str) -> Iterator[str]:
    """Yield a temporary path beside ``final`` to write; once the block ends, make the file durable and
    rename it to ``final``; if the block (or the rename) fails, remove it and re-raise.

    Example:
        >>> from fsspec.implementations.memory import MemoryFileSystem
        >>> fs = MemoryFileSystem()
        >>> with atomic(fs, "/doc/atomic-example.txt") as tmp:
        ...     fs.pipe_file(tmp, b"all or nothing")
        >>> fs.cat_file("/doc/atomic-example.txt")
        b'all or nothing'
    """
    folder = posixpath.dirname(final)
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    fs.makedirs(folder, exist_ok=True)
    try:
        yield tmp
        durable(fs, tmp)
        fs.mv(tmp, final)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise
    durable(fs, folder)


def durable(fs: AbstractFileSystem, path: str) -> None:
    """Make a local file's (or folder's) content durable; a written file's pages are dropped from the page
    cache too, since flor reads a checkpoint again only in a replay. Elsewhere the store makes a file
    durable as it is closed: nothing to do."""
    if not isinstance(fs, LocalFileSystem):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise") and not os.path.isdir(path):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
