"""Where flor keeps things: the log store, the checkpoint root and the project name."""

from __future__ import annotations

import os
import posixpath
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem

from flor_lightning._errors import ConfigError
from flor_lightning._shadow import find_repo_root


@dataclass(frozen=True)
class Location:
    """The folders a run uses.

    Attributes:
        root: the git repository root, or the working directory outside git.
        in_git: whether ``root`` is a git work tree.
        db_path: the sqlite log store (``<root>/.flor/flor.db`` unless ``FLOR_DB`` is set).
        project: the project name (the root folder's name), used under the checkpoint root.
    """

    root: Path
    in_git: bool
    db_path: Path
    project: str


def locate(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Location:
    """Find the project root and log store for ``cwd`` (default: the working directory)."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    repo = find_repo_root(cwd)
    root = repo if repo is not None else cwd.resolve()
    db = Path(env["FLOR_DB"]) if env.get("FLOR_DB") else root / ".flor" / "flor.db"
    return Location(root=root, in_git=repo is not None, db_path=db, project=root.name or "project")


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in posix form, or the absolute path where it lies outside ``root``."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def script(loc: Location, argv: Sequence[str] | None = None) -> str | None:
    """The running script (``argv[0]``, default ``sys.argv``) as the store records it: relative to the
    project root, absolute outside it; None when there is no script (an interactive session)."""
    argv = sys.argv if argv is None else argv
    return relative(Path(argv[0]), loc.root) if argv and argv[0] else None


def checkpoint_root(project: str, override: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The checkpoint root URL for ``project``: ``override``, else ``$FLOR_HOME/<project>``, else ``~/.flor/<project>``.

    Raises:
        ConfigError: ``FLOR_HOME`` names an existing file.
    """
    if override:
        return override.rstrip("/")
    env = os.environ if env is None else env
    home = env.get("FLOR_HOME") or str(Path.home() / ".flor")
    if "://" not in home and Path(home).is_file():
        raise ConfigError(f"FLOR_HOME={home!r} is a file; it must be a folder (or an fsspec URL) for checkpoints.")
    return f"{home.rstrip('/')}/{project}"


def ignore_flor_folder(folder: Path) -> None:
    """Give flor's own ``.flor`` folder a ``.gitignore`` of ``*`` so git (and the shadow branch) skip it.

    Any other folder (one ``FLOR_DB`` points into: a repository root, a shared folder) is left
    alone: a ``*`` there would make git ignore the user's files.
    """
    if folder.name != ".flor":
        return
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".gitignore"
    if not marker.exists():
        marker.write_text("# created by flor_lightning: the log store is not source code\n*\n")


def fs_for(path: str, root: str | AbstractFileSystem | None) -> tuple[AbstractFileSystem, str]:
    """The filesystem holding an indexed checkpoint ``path``, and the path on it.

    A path with a protocol (what ``flor push`` indexes) names its own filesystem; a bare path lies on
    ``root``'s: the run's checkpoint root (a URL or a filesystem already open), local where None.
    """
    if "://" in path:
        return open_fs(path)
    if isinstance(root, AbstractFileSystem):
        return root, path
    return (open_fs(root)[0] if root else open_fs(path)[0]), path


def open_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem and root path for ``url`` (a local path or any fsspec URL)."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ConfigError(
            f"cannot use checkpoint location {url!r}: {err}. Install the fsspec backend for that protocol "
            "(e.g. s3fs for s3://) or pass a local path."
        ) from err
    return fs, root.rstrip("/")


# Filesystems whose files live inside one process: nothing another process (a replay, `flor`) can read.
PROCESS_LOCAL = frozenset({"memory"})


def protocol(fs: AbstractFileSystem) -> str:
    """The main protocol name of ``fs`` (``file`` for local paths)."""
    names = fs.protocol
    return names if isinstance(names, str) else names[0]


def process_local(fs: AbstractFileSystem) -> bool:
    """Whether the files of ``fs`` vanish with this process (``memory://``)."""
    return protocol(fs) in PROCESS_LOCAL


def check_writable(fs: AbstractFileSystem, folder: str, *, what: str, hint: str) -> None:
    """Create ``folder`` and prove a file can be written there (the probe is removed again).

    Raises:
        ConfigError: it cannot, with ``what`` (e.g. "write checkpoints to") and ``hint`` (what to do).
    """
    probe = f"{folder}/.probe-{uuid.uuid4().hex}"
    try:
        fs.makedirs(folder, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot {what} {folder!r}: {err}. {hint}") from err


PACKS = "packs"  # the folder of checkpoint pack files under a checkpoint root


def split(path: str) -> tuple[str, str]:
    """A checkpoint's path as (its root, its name under the root): ``/r/run/epoch=00001.manifest`` ->
    ``("/r", "run/epoch=00001.manifest")``. Packs lie in ``<root>/packs``, beside the manifest's run folder."""
    run_dir, file = posixpath.split(path.rstrip("/"))
    root, run = posixpath.split(run_dir)
    return root, f"{run}/{file}"
