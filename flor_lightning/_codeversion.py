"""The code a run (or a replay) is recorded with: one function commits it, leaving the outputs out.

A snapshot holds code, not outputs (:mod:`flor_lightning._shadow` says which files it takes).
Where the outputs are is known only at run time, from the Trainer and flor's own settings:
each logger's save and log folder, each checkpoint callback's ``dirpath``, ``default_root_dir``'s
``lightning_logs/``, the log store (``FLOR_DB``, ``.flor/``), the checkpoint root (``FLOR_HOME``,
``checkpoint_dir``) and the file the process's output is redirected into (``python train.py > r1.log``).
:func:`exclusions` turns them into the repo-relative prefixes the snapshot leaves out; a folder
holding the whole repository (a logger writing to ``"."``) is never one of them. Tracked files
always go in, wherever they are.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from flor_lightning import _shadow as shadow
from flor_lightning._errors import GitError
from flor_lightning._locate import Location

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)
_warned_no_git = False

TRAINER_OUTPUT = "written by the Trainer"
FLOR_FILES = "flor's log store and checkpoints"
REDIRECTED_OUTPUT = "the run's redirected output"


def local_path(location: str | os.PathLike[str] | None) -> Path | None:
    """The absolute local path of a folder or fsspec URL (``file://`` included); None for remote ones."""
    if location is None:
        return None
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        return None
    return Path(text).resolve() if text else None


def trainer_outputs(trainer: pl.Trainer) -> list[Path]:
    """The local folders the Trainer writes into: its loggers' folders, its checkpoint callbacks'
    ``dirpath`` and ``default_root_dir/lightning_logs`` (``default_root_dir/checkpoints`` for a
    checkpoint callback that has no folder yet and no logger to put one under)."""
    root = Path(trainer.default_root_dir)
    found: list[str | os.PathLike[str] | None] = [root / "lightning_logs"]
    for logger in trainer.loggers:
        found += [getattr(logger, "save_dir", None), getattr(logger, "log_dir", None)]
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        found.append(root / "checkpoints" if dirpath is None and not trainer.loggers else dirpath)
    paths = (local_path(p) for p in found if isinstance(p, str | os.PathLike))
    return [p for p in paths if p is not None]


def flor_outputs(loc: Location, checkpoint_url: str | None, env: Mapping[str, str] | None = None) -> list[Path]:
    """flor's own files: ``.flor/``, the log store (``FLOR_DB``) with its sqlite side files and
    replay logs, the checkpoint root and ``FLOR_HOME`` (when local)."""
    env = os.environ if env is None else env
    db = loc.db_path.resolve()
    found = [loc.root / ".flor", db, db.parent / "replay-logs"]
    found += [db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
    found += [p for p in (local_path(checkpoint_url), local_path(env.get("FLOR_HOME") or None)) if p is not None]
    return found


def redirected_output() -> list[Path]:
    """The regular files this process's stdout and stderr are redirected into (where the OS says: Linux)."""
    found = []
    for fd in (1, 2):
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                found.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # closed, or no /proc
            continue
    return found


def exclusions(root: Path, groups: Mapping[str, Iterable[Path]]) -> dict[str, str]:
    """The repo-relative prefixes to leave out of a snapshot of ``root``, each with its reason.

    ``groups`` maps a reason to absolute paths; those outside ``root``, and ``root`` itself or a
    folder around it, are dropped (excluding them would leave out the whole project).

    Example:
        >>> exclusions(Path("/p"), {"written by the Trainer": [Path("/p/logs"), Path("/p"), Path("/tmp/x")]})
        {'logs': 'written by the Trainer'}
    """
    found: dict[str, str] = {}
    for why, paths in groups.items():
        for path in paths:
            if root in path.parents:
                found.setdefault(path.relative_to(root).as_posix(), why)
    return found


def run_exclusions(loc: Location, trainer: pl.Trainer, checkpoint_url: str | None) -> dict[str, str]:
    """Everything a snapshot taken for ``trainer``'s run leaves out (see the module docstring)."""
    return exclusions(
        loc.root,
        {
            FLOR_FILES: flor_outputs(loc, checkpoint_url),
            TRAINER_OUTPUT: trainer_outputs(trainer),
            REDIRECTED_OUTPUT: redirected_output(),
        },
    )


def commit_code(
    loc: Location,
    message: str,
    *,
    exclude: Mapping[str, str],
    max_file_bytes: int = shadow.DEFAULT_MAX_FILE_BYTES,
) -> shadow.CodeVersion | None:
    """Snapshot the project's code to the shadow branch; None (with a warning) outside git or when git fails.

    Record and replay both commit through here, so a run's code and a replay's are taken alike.
    """
    global _warned_no_git
    if not loc.in_git:
        if not _warned_no_git:
            log.warning(
                "flor: %s is not in a git repository; recording without a code snapshot. Run 'git init' "
                "and commit your code to record code versions (replay compares code with them)",
                loc.root,
            )
            _warned_no_git = True
        return None
    try:
        version = shadow.snapshot(loc.root, message=message, max_file_bytes=max_file_bytes, exclude=exclude)
    except GitError as err:
        log.warning("flor: the code snapshot failed (%s); going on without it", err)
        return None
    if version.skipped:
        log.warning(
            "flor: left out of the code snapshot (over %d bytes): %s. Add them to .gitignore, or raise "
            "FlorCallback(max_file_bytes=...) to include them",
            max_file_bytes,
            version.skipped,
        )
    return version
