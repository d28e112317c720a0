"""Commit a snapshot of the user's working tree to the ``flor.shadow`` branch.

A snapshot is built with git plumbing only: the files go into a *temporary* index
(``GIT_INDEX_FILE`` in a temp folder), ``git write-tree`` turns it into a tree and
``git commit-tree`` makes a commit whose only parent is the previous shadow tip, so the
shadow branch is a linear history of snapshots. The user's HEAD, current branch, index
and working files are never touched; only new objects and the shadow ref are written.

What goes in: the code. Tracked files that still exist always go in (the user chose to
track them), and so do untracked files that ``.gitignore`` does not ignore, as they are on
disk (staged or not), except outputs: untracked paths under an ``exclude`` prefix (flor's own
store and checkpoints, the folders the Trainer writes into), inside a virtualenv (a folder
holding ``pyvenv.cfg``) or a ``__pycache__`` folder, and untracked binary files (a NUL byte in
the first 8000 bytes, git's own test). Any file over ``max_file_bytes`` is left out too, and
anything that is not a regular file or a symlink (submodules, nested repositories, sockets).
What was left out is reported in :attr:`CodeVersion.left_out`, a folder once for all its files.
Symlinks are committed as links (mode ``120000``), as ``git add`` would; their targets are
not followed.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import git

from flor_lightning._codecheck import holds_pyvenv_cfg
from flor_lightning._errors import ConfigError, GitError

SHADOW_BRANCH = "flor.shadow"
DEFAULT_MAX_FILE_BYTES = 5 * 1024 * 1024

_ATTEMPTS = 10  # compare-and-swap tries before giving up on a busy shadow branch
_DEFAULT_IDENTITY = (("name", "flor"), ("email", "flor@localhost"))


@dataclass(frozen=True)
class CodeVersion:
    """The code a run was started with.

    Attributes:
        shadow_commit: sha of the new commit on the shadow branch.
        head_commit: the user's HEAD sha, or None in a repository with no commits.
        branch: the user's current branch name, or None when HEAD is detached.
        skipped: repo-relative paths left out because they exceed ``max_file_bytes``.
        left_out: everything left out (those too), each with its reason: ``{"lightning_logs/":
            "written by the Trainer", "model.bin": "untracked binary file", ...}``; a folder ends in ``/``.
    """

    shadow_commit: str
    head_commit: str | None
    branch: str | None
    skipped: tuple[str, ...]
    left_out: Mapping[str, str] = field(default_factory=dict)


def find_repo_root(path: Path) -> Path | None:
    """Top of the git work tree containing ``path``, or None outside git (no exception)."""
    try:
        with git.Repo(path, search_parent_directories=True) as repo:
            top = repo.working_tree_dir
    except git.exc.GitError:  # GitPython's base: not a repository, no such path, ...
        return None
    return None if top is None else Path(top).resolve()


def snapshot(
    repo_root: Path,
    *,
    message: str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    branch: str = SHADOW_BRANCH,
    exclude: Mapping[str, str] | Iterable[str] = (".flor/",),
) -> CodeVersion:
    """Commit the working tree to ``branch`` and return the version.

    Args:
        repo_root: a folder inside the git work tree to snapshot.
        message: the commit message (its subject line).
        max_file_bytes: files larger than this are left out and listed in ``skipped``.
        branch: the shadow branch name; created on the first snapshot.
        exclude: repo-relative folders or files whose untracked files are left out, or a mapping
            of them to the reason :attr:`CodeVersion.left_out` gives; ``"data"`` and ``"data/"``
            both exclude ``data/...`` but not ``database.py``.

    Raises:
        ConfigError: ``max_file_bytes`` is negative.
        GitError: ``repo_root`` is not in a git work tree, ``branch`` is checked out, or git failed.
    """
    if max_file_bytes < 0:
        raise ConfigError(f"max_file_bytes must be >= 0, got {max_file_bytes}; use e.g. {DEFAULT_MAX_FILE_BYTES}.")
    try:
        with git.Repo(repo_root, search_parent_directories=True) as repo:
            if repo.working_tree_dir is None:
                raise GitError(f"{repo_root} is a bare repository; snapshot a folder with a working tree.")
            head, current = _head(repo)
            if current == branch:
                raise GitError(
                    f"branch {branch!r} is checked out in {repo.working_tree_dir}; flor moves that branch on "
                    "every run. Check out your own branch (git switch -) or pass another shadow branch name."
                )
            reasons = dict(exclude) if isinstance(exclude, Mapping) else dict.fromkeys(exclude, "excluded")
            files, left_out = select(Path(repo.working_tree_dir), *_listed(repo), reasons, max_file_bytes)
            with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
                tree = _write_tree(repo, files, Path(tmp))
            trailers = [f"Flor-Head: {head}"] if head else []
            trailers += [f"Flor-Branch: {current}"] if current else []
            messages = [message, "\n".join(trailers)] if trailers else [message]
            commit = _advance(repo, f"refs/heads/{branch}", tree, messages, _identity_env(repo))
    except git.exc.GitError as err:
        raise GitError(
            f"could not commit a code snapshot of {repo_root} to branch {branch!r}: {err}. "
            "Expected a git work tree where git runs; run 'git status' there to see what is wrong, "
            "or run without code snapshots."
        ) from err
    skipped = tuple(p for p, why in left_out.items() if why == _too_big(max_file_bytes))
    return CodeVersion(shadow_commit=commit, head_commit=head, branch=current, skipped=skipped, left_out=left_out)


def read_file(repo_root: Path, commit: str, path: str) -> str | None:
    """Text of ``path`` (repo-relative, posix) at ``commit``, or None if absent.

    Bytes that are not UTF-8 are replaced with U+FFFD. A folder at ``path`` counts as absent.

    Raises:
        GitError: ``commit`` is not in the repository, or git failed.
    """
    try:
        with git.Repo(repo_root, search_parent_directories=True) as repo:
            if not has_commit(repo, commit):
                raise GitError(
                    f"commit {commit!r} is not in the repository at {repo_root}; expected a commit of the "
                    f"{SHADOW_BRANCH!r} branch. Fetch it (git fetch origin {SHADOW_BRANCH}) or pick a recorded commit."
                )
            spec = f"{commit}:{path.lstrip('/')}"
            if repo.git.cat_file("-t", spec, with_exceptions=False) != "blob":
                return None
            data = repo.git.cat_file("blob", spec, stdout_as_string=False, strip_newline_in_stdout=False)
    except git.exc.GitError as err:
        raise GitError(f"could not read {path!r} at {commit!r} in {repo_root}: {err}. Run 'git status' there.") from err
    return bytes(data).decode("utf-8", errors="replace")


def has_commit(repo: git.Repo, commit: str) -> bool:
    """Whether ``commit`` (a sha or any name git resolves) is a commit of ``repo``."""
    return _verify(repo, f"{commit}^{{commit}}") is not None


def _verify(repo: git.Repo, rev: str) -> str | None:
    """The sha ``rev`` names, or None when it names nothing (``rev-parse`` exits 1 quietly)."""
    return repo.git.rev_parse("-q", "--verify", rev, with_exceptions=False) or None


def _head(repo: git.Repo) -> tuple[str | None, str | None]:
    """The user's HEAD sha (None before the first commit) and branch (None when detached)."""
    branch = repo.git.symbolic_ref("-q", "--short", "HEAD", with_exceptions=False) or None
    return _verify(repo, "HEAD^{commit}"), branch


def _listed(repo: git.Repo) -> tuple[list[str], list[str]]:
    """Tracked paths (may include deleted files) and untracked, non-ignored ones, as git lists them."""

    def ls(*flags: str) -> list[str]:
        out = repo.git.ls_files(*flags, "-z", strip_newline_in_stdout=False)
        return sorted({p for p in out.split("\0") if p})  # unmerged paths are listed once per stage

    return ls("--cached"), ls("--others", "--exclude-standard")


def is_binary(data: bytes | None) -> bool:
    """Whether ``data`` looks binary to git: a NUL byte among its first 8000 bytes."""
    return data is not None and b"\0" in data[:8000]


def _too_big(max_bytes: int) -> str:
    return f"over {max_bytes} bytes"


def select(
    root: Path, tracked: Iterable[str], untracked: Iterable[str], exclude: Mapping[str, str], max_bytes: int
) -> tuple[list[str], dict[str, str]]:
    """The paths a snapshot commits, and what it leaves out with the reason (see the module docstring).

    Args:
        root: the work tree's top folder.
        tracked: repo-relative paths git tracks; all go in but those over ``max_bytes``.
        untracked: repo-relative untracked paths git does not ignore; outputs among them stay out.
        exclude: repo-relative folders or files whose untracked files stay out, with the reason.
        max_bytes: the size limit for every regular file.
    """
    # the outermost excluded folder names what was left out, so shorter prefixes are tried first
    prefixes = {e.strip("/"): why for e, why in sorted(exclude.items(), key=lambda e: len(e[0])) if e.strip("/")}
    venvs: dict[Path, bool] = {}
    keep: list[str] = []
    left_out: dict[str, str] = {}
    tracked = set(tracked)
    for path in sorted({*tracked, *untracked}):
        try:
            info = os.lstat(root / path)
        except OSError:  # deleted since git listed it, or a tracked file removed from disk
            continue
        regular = stat.S_ISREG(info.st_mode)
        if not regular and not stat.S_ISLNK(info.st_mode):
            continue
        mine = path in tracked
        why = None if mine else _output(root, path, prefixes, venvs)
        if why is None and regular and info.st_size > max_bytes:
            why = path, _too_big(max_bytes)
        if why is None and regular and not mine and _binary_file(root / path):
            why = path, "untracked binary file"
        if why is None:
            keep.append(path)
        else:
            left_out.setdefault(*why)
    return keep, left_out


def _output(root: Path, path: str, prefixes: Mapping[str, str], venvs: dict[Path, bool]) -> tuple[str, str] | None:
    """Whether untracked ``path`` lies in an output folder: (that folder, or the excluded file, and the reason)."""
    for prefix, why in prefixes.items():
        if path == prefix or path.startswith(prefix + "/"):
            return (prefix if path == prefix else prefix + "/"), why
    parts = path.split("/")
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        if parts[depth - 1] == "__pycache__":
            return folder + "/", "bytecode cache"
        if venvs.setdefault(root / folder, holds_pyvenv_cfg(root / folder)):
            return folder + "/", "virtualenv"
    return None


def _binary_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return is_binary(f.read(8000))
    except OSError:  # unreadable: git could not add it either
        return True


def _write_tree(repo: git.Repo, paths: list[str], tmp: Path) -> str:
    """Hash ``paths`` into a fresh index under ``tmp`` and return its tree sha."""
    env = {"GIT_INDEX_FILE": str(tmp / "index")}  # never the user's .git/index
    listing = tmp / "paths"
    listing.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in paths))
    with listing.open("rb") as stdin:
        # --remove: a file deleted between listing and hashing is dropped instead of failing.
        repo.git.update_index("--add", "--remove", "-z", "--stdin", istream=stdin, env=env)
    return str(repo.git.write_tree(env=env))


def _tip(repo: git.Repo, ref: str) -> str | None:
    return _verify(repo, f"{ref}^{{commit}}")  # None: the branch does not exist yet


def _advance(repo: git.Repo, ref: str, tree: str, messages: list[str], env: dict[str, str]) -> str:
    """Commit ``tree`` on top of ``ref`` and move ``ref`` to it with compare-and-swap.

    If another process moves ``ref`` in between, the commit is rebuilt on the new tip,
    so concurrent snapshots all stay on the branch, one after another.
    """
    error = ""
    for attempt in range(_ATTEMPTS):
        parent = _tip(repo, ref)
        args = [tree, "--no-gpg-sign", *(["-p", parent] if parent else [])]
        for text in messages:
            args += ["-m", text]
        new = str(repo.git.commit_tree(*args, env=env))
        old = parent or "0" * len(new)  # all zeros: the ref must not exist yet
        status, _, error = repo.git.update_ref(
            "-m", "flor: code snapshot", ref, new, old, with_exceptions=False, with_extended_output=True
        )
        if status == 0:
            return new
        time.sleep(0.01 * (attempt + 1))  # let the process holding the ref lock finish
    raise GitError(
        f"could not move {ref} after {_ATTEMPTS} tries; it kept changing or could not be locked: {error.strip()}. "
        f"Check that no other git process is stuck holding {ref}.lock, then run again."
    )


def _identity_env(repo: git.Repo) -> dict[str, str]:
    """Author/committer defaults for when git has no ``user.name``/``user.email`` configured."""
    env: dict[str, str] = {}
    for key, default in _DEFAULT_IDENTITY:
        if repo.git.config("--get", f"user.{key}", with_exceptions=False):
            continue
        for role in ("AUTHOR", "COMMITTER"):
            var = f"GIT_{role}_{key.upper()}"
            if not os.environ.get(var):
                env[var] = default
    return env
