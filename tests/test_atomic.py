"""The one atomic-write helper: all of a file under its final name, or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from flor_lightning._atomic import TEMPORARY, atomic


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_write_lands_whole_under_its_final_name(kind: str, tmp_path: Path) -> None:
    fs = LocalFileSystem() if kind == "local" else MemoryFileSystem()
    final = f"{tmp_path if kind == 'local' else '/atomic-test-ok'}/sub/file.bin"
    with atomic(fs, final) as tmp:
        assert not fs.exists(final)  # nothing under the final name while the block writes
        fs.pipe_file(tmp, b"x" * 1000)
    assert fs.cat_file(final) == b"x" * 1000
    assert not fs.glob(f"{final.rsplit('/', 1)[0]}/{TEMPORARY}")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_failed_write_leaves_nothing_and_raises(kind: str, tmp_path: Path) -> None:
    fs = LocalFileSystem() if kind == "local" else MemoryFileSystem()
    folder = f"{tmp_path if kind == 'local' else '/atomic-test-fail'}/sub"
    with pytest.raises(RuntimeError, match="disk full"), atomic(fs, f"{folder}/file.bin") as tmp:
        fs.pipe_file(tmp, b"half")
        raise RuntimeError("disk full")
    assert fs.ls(folder, detail=False) == []


def test_an_earlier_file_stays_until_the_new_one_is_complete(tmp_path: Path) -> None:
    fs, final = LocalFileSystem(), str(tmp_path / "file.bin")
    fs.pipe_file(final, b"old")
    with pytest.raises(ValueError), atomic(fs, final) as tmp:
        fs.pipe_file(tmp, b"new but broken")
        raise ValueError
    assert fs.cat_file(final) == b"old"
    with atomic(fs, final) as tmp:
        fs.pipe_file(tmp, b"new")
    assert fs.cat_file(final) == b"new"
