"""Bring today's edits into an older code version with a 3-way merge, file by file.

The edits are the *code* that differs between a *base* version (a commit, normally the
shadow commit of the latest recorded run) and the working tree: tracked files, untracked
Python source, and config files named on the run's command line (``--config x.yaml``, see
:func:`named_configs`). Anything else that differs (a log a shell redirect wrote, an output)
is never merged and never makes a version conflict; it is listed in :attr:`Edits.left_out`.
For each edited file, with *ours* the older version's file, *base* the base's and *theirs*
the working tree's:

- ours equals base: the older version never touched the file since; theirs is taken whole
  (added, changed or deleted).
- theirs equals base, or ours equals theirs: nothing to bring.
- otherwise ``git merge-file`` merges the three; overlapping changes, or a file deleted on
  one side and changed on the other, are a *conflict*, never guessed.

Binary files (a NUL byte in their first 8000 bytes, git's own test) are not brought in, tracked
ones included: model files or checkpoints are outputs, not edits.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import git

from flor_lightning import _shadow as shadow
from flor_lightning._errors import GitError
from flor_lightning._shadow import is_binary

MergeFile = Callable[[bytes, bytes, bytes], "tuple[bytes, bool]"]


CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml", ".ini", ".cfg", ".conf")
SOURCE_SUFFIXES = (".py", ".pyi")


@dataclass(frozen=True)
class Edits:
    """What changed since ``base``: the working tree's tree sha, the changed code (repo-relative
    paths) and the changed files that are not code, left out."""

    base: str
    tree: str
    paths: tuple[str, ...]
    left_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeResult:
    """The outcome of merging the edits into one version.

    Attributes:
        written: files changed in the older version (written or deleted).
        conflicts: files where the edits and the older version's code overlap.
        binary: edited binary files, left as the older version has them.
    """

    written: tuple[str, ...]
    conflicts: tuple[str, ...]
    binary: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """``conflict``, ``merged`` (something written) or ``unchanged``."""
        return "conflict" if self.conflicts else "merged" if self.written else "unchanged"


def three_way(
    ours: bytes | None, base: bytes | None, theirs: bytes | None, merge_file: MergeFile
) -> tuple[bytes | None, bool]:
    """The merged content of one file (None: absent) and whether it conflicts. ``None`` inputs are absent files."""
    if ours == base:
        return theirs, False
    if theirs in (base, ours):
        return ours, False
    if ours is None or base is None or theirs is None:
        return ours, True  # added differently on both sides, or deleted on one and changed on the other
    return merge_file(ours, base, theirs)


def git_merge_file(ours: bytes, base: bytes, theirs: bytes) -> tuple[bytes, bool]:
    """``git merge-file -p``: the merged text and whether it has conflicts (binary files always do)."""
    with tempfile.TemporaryDirectory(prefix="flor-merge-") as tmp:
        paths = []
        for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
            path = Path(tmp) / name
            path.write_bytes(data)
            paths.append(str(path))
        done = subprocess.run(
            ["git", "merge-file", "-p", "-L", "recorded", "-L", "base", "-L", "current", *paths],
            capture_output=True,
            check=False,
        )
    # exit status: 0 clean, the number of conflicts (> 0), or an error (binary file, ...)
    return done.stdout, done.returncode != 0


def named_configs(argv: Sequence[str], cwd: Path, root: Path) -> tuple[str, ...]:
    """Repo-relative paths of the config files a command line names (``--config x.yaml``,
    ``--config=x.yaml``, ``fit -c conf/a.yml``), resolved against the run's working directory ``cwd``.

    Example:
        >>> named_configs(["fit", "--config=conf/a.yaml", "--lr", "0.1"], Path("/p/exp"), Path("/p"))
        ('exp/conf/a.yaml',)
    """
    found = set()
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if value.lower().endswith(CONFIG_SUFFIXES):
            path = Path(os.path.normpath(cwd / value))
            if root in path.parents:
                found.add(path.relative_to(root).as_posix())
    return tuple(sorted(found))


def code_edits(
    changed: Iterable[str], tracked: Iterable[str], configs: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split changed paths into (code edits, the rest): tracked files, Python source and ``configs`` are code."""
    code = {*tracked, *configs}
    edits: list[str] = []
    rest: list[str] = []
    for path in changed:
        (edits if path in code or path.endswith(SOURCE_SUFFIXES) else rest).append(path)
    return tuple(edits), tuple(rest)


def edits_since(repo_root: Path, base: str, *, configs: Iterable[str] = ()) -> Edits:
    """The code that differs between commit ``base`` and the working tree (see the module docstring).

    Args:
        repo_root: a folder of the git work tree.
        base: the commit the edits started from.
        configs: repo-relative config files that count as code (:func:`named_configs`).

    Raises:
        GitError: ``base`` is not a commit of the repository, or git failed.
    """
    try:
        with git.Repo(repo_root, search_parent_directories=True) as repo:
            if not shadow.has_commit(repo, base):
                raise GitError(f"base {base!r} is not a commit of the repository at {repo_root}; pass a commit sha")
            top = Path(str(repo.working_tree_dir))
            tracked, untracked = shadow._listed(repo)
            files, _ = shadow.select(top, tracked, untracked, {".flor/": ""}, shadow.DEFAULT_MAX_FILE_BYTES)
            with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
                tree = shadow._write_tree(repo, files, Path(tmp))
            out = repo.git.diff_tree("-r", "--no-renames", "--name-only", "-z", base, tree)
    except git.exc.GitError as err:
        raise GitError(f"could not compare the working tree of {repo_root} with {base!r}: {err}") from err
    edits, rest = code_edits((p for p in out.split("\0") if p), tracked, configs)
    return Edits(base=base, tree=tree, paths=edits, left_out=rest)


def merge_into(worktree: Path, ours: str, edits: Edits, *, merge_file: MergeFile = git_merge_file) -> MergeResult:
    """Merge ``edits`` into ``worktree``, a checkout of commit ``ours``; conflicting files are left as they were."""
    written: list[str] = []
    conflicts: list[str] = []
    binary: list[str] = []
    with git.Repo(worktree) as repo:
        for path in edits.paths:
            mine, base, theirs = (_blob(repo, rev, path) for rev in (ours, edits.base, edits.tree))
            if any(is_binary(b) for b in (mine, base, theirs)):
                binary.append(path)
                continue
            result, conflict = three_way(mine, base, theirs, merge_file)
            if conflict:
                conflicts.append(path)
            elif result != mine:
                _write(worktree / path, result)
                written.append(path)
    return MergeResult(written=tuple(written), conflicts=tuple(conflicts), binary=tuple(binary))


def _blob(repo: git.Repo, rev: str, path: str) -> bytes | None:
    spec = f"{rev}:{path}"
    if repo.git.cat_file("-t", spec, with_exceptions=False) != "blob":
        return None
    return bytes(repo.git.cat_file("blob", spec, stdout_as_string=False, strip_newline_in_stdout=False))


def _write(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def describe(paths: Iterable[str]) -> str:
    """``a.py, b.py`` for a report."""
    return ", ".join(paths) or "-"


def summarize(paths: Iterable[str]) -> str:
    """``lightning_logs/ (6 files), r2.log`` for a report: top-level files, and folders with their file count."""
    counts: dict[str, int] = {}
    for path in paths:
        top = path.split("/", 1)[0] + "/" if "/" in path else path
        counts[top] = counts.get(top, 0) + 1
    parts = [f"{name} ({n} files)" if name.endswith("/") and n > 1 else name for name, n in sorted(counts.items())]
    return ", ".join(parts) or "-"
