"""Tests for flor_lightning._shadow against real git repositories in tmp_path."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from flor_lightning import _shadow as shadow
from flor_lightning._errors import ConfigError, GitError
from flor_lightning._shadow import SHADOW_BRANCH, CodeVersion, find_repo_root, read_file, snapshot


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _tree(root: Path, commit: str) -> set[str]:
    return set(_git(root, "ls-tree", "-r", "--name-only", commit).splitlines())


def _working_files(root: Path) -> dict[str, bytes]:
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] != ".git" and path.is_file():
            files[rel.as_posix()] = path.read_bytes()
    return files


def _user_state(root: Path) -> tuple[str, str, str, bytes, dict[str, bytes]]:
    """HEAD, branch, status, index bytes and working files; read without refreshing the index."""
    head = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    branch = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    status = _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=all")
    index = root / ".git" / "index"
    return head.stdout, branch.stdout, status, index.read_bytes() if index.exists() else b"", _working_files(root)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("print('v1')\n")
    (root / "staged.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "initial")
    return root


def test_snapshot_commits_working_tree_without_touching_user_state(repo: Path) -> None:
    (repo / "train.py").write_text("print('v2, unstaged')\n")
    (repo / "staged.py").write_text("x = 2\n")
    _git(repo, "add", "staged.py")
    (repo / "staged.py").write_text("x = 3\n")  # index, HEAD and disk now all differ
    (repo / "notes.md").write_text("untracked\n")
    (repo / "run.log").write_text("ignored\n")
    (repo / ".flor").mkdir()
    (repo / ".flor" / "flor.db").write_bytes(b"sqlite")
    (repo / "big.bin").write_bytes(b"0" * 2000)
    head = _git(repo, "rev-parse", "HEAD")
    before = _user_state(repo)

    version = snapshot(repo, message="flor run 1", max_file_bytes=1000)

    assert _user_state(repo) == before
    assert version == CodeVersion(
        shadow_commit=_git(repo, "rev-parse", SHADOW_BRANCH),
        head_commit=head,
        branch="main",
        skipped=("big.bin",),
        left_out={".flor/": "excluded", "big.bin": "over 1000 bytes"},
    )
    assert _tree(repo, version.shadow_commit) == {".gitignore", "train.py", "staged.py", "notes.md"}
    assert _git(repo, "show", f"{version.shadow_commit}:train.py") == "print('v2, unstaged')"
    assert _git(repo, "show", f"{version.shadow_commit}:staged.py") == "x = 3"
    assert _git(repo, "log", "-1", "--format=%s", version.shadow_commit) == "flor run 1"
    assert f"Flor-Head: {head}" in _git(repo, "log", "-1", "--format=%b", version.shadow_commit)
    assert _git(repo, "rev-list", "--parents", "-n1", version.shadow_commit) == version.shadow_commit  # no parent


def test_second_snapshot_has_first_as_only_parent(repo: Path) -> None:
    first = snapshot(repo, message="one")
    (repo / "train.py").write_text("print('v2')\n")
    second = snapshot(repo, message="two")

    assert _git(repo, "rev-list", "--parents", "-n1", second.shadow_commit).split() == [
        second.shadow_commit,
        first.shadow_commit,
    ]
    assert _git(repo, "rev-parse", SHADOW_BRANCH) == second.shadow_commit
    assert read_file(repo, first.shadow_commit, "train.py") == "print('v1')\n"
    assert read_file(repo, second.shadow_commit, "train.py") == "print('v2')\n"


def test_snapshot_in_repo_without_commits(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "train.py").write_text("print('hi')\n")
    before = _user_state(tmp_path)

    version = snapshot(tmp_path, message="first")

    assert _user_state(tmp_path) == before
    assert version.head_commit is None
    assert version.branch == "main"
    assert _tree(tmp_path, version.shadow_commit) == {"train.py"}


def test_snapshot_with_detached_head(repo: Path) -> None:
    head = _git(repo, "rev-parse", "HEAD")
    _git(repo, "checkout", "-q", "--detach")
    before = _user_state(repo)

    version = snapshot(repo, message="detached")

    assert _user_state(repo) == before
    assert (version.head_commit, version.branch) == (head, None)


def test_snapshot_leaves_out_deleted_excluded_and_special_files(repo: Path) -> None:
    (repo / "staged.py").unlink()
    (repo / "data").mkdir()
    (repo / "data" / "x.csv").write_text("1\n")
    (repo / "database.py").write_text("db = 1\n")
    (repo / "link.py").symlink_to("train.py")
    _git(repo, "init", "-q", str(repo / "nested"))
    (repo / "nested" / "inner.py").write_text("inner\n")

    version = snapshot(repo, message="m", exclude=("data",))

    assert _tree(repo, version.shadow_commit) == {".gitignore", "train.py", "database.py", "link.py"}
    assert _git(repo, "ls-tree", version.shadow_commit, "link.py").startswith("120000 ")  # kept as a link


def test_read_file(repo: Path) -> None:
    version = snapshot(repo, message="m")

    assert read_file(repo, version.shadow_commit, "train.py") == "print('v1')\n"
    assert read_file(repo, version.shadow_commit, "missing.py") is None
    with pytest.raises(GitError, match="not in the repository"):
        read_file(repo, "0" * 40, "train.py")


def test_read_file_of_folder_is_none(repo: Path) -> None:
    (repo / "pkg").mkdir()
    (repo / "pkg" / "mod.py").write_text("m\n")
    version = snapshot(repo, message="m")

    assert read_file(repo, version.shadow_commit, "pkg/mod.py") == "m\n"
    assert read_file(repo, version.shadow_commit, "pkg") is None


def test_concurrent_snapshots_all_land_on_branch(repo: Path) -> None:
    count = 6
    barrier = threading.Barrier(count)
    versions: list[CodeVersion] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            versions.append(snapshot(repo, message=f"thread {i}"))
        except BaseException as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    history = _git(repo, "rev-list", SHADOW_BRANCH).split()
    assert sorted(history) == sorted(v.shadow_commit for v in versions)
    assert _git(repo, "rev-list", "--min-parents=2", SHADOW_BRANCH) == ""  # linear


def test_snapshot_rebuilds_on_tip_moved_by_another_process(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = snapshot(repo, message="first")
    real_tip = shadow._tip
    rival: list[CodeVersion] = []

    def tip_then_rival_moves_branch(git_repo: object, ref: str) -> str | None:
        tip = real_tip(git_repo, ref)  # type: ignore[arg-type]
        if not rival:  # only once: the rival's own snapshot reads the tip normally
            rival.append(first)
            rival[0] = snapshot(repo, message="rival")
        return tip

    monkeypatch.setattr(shadow, "_tip", tip_then_rival_moves_branch)
    late = snapshot(repo, message="late")

    assert _git(repo, "rev-list", "--first-parent", SHADOW_BRANCH).split() == [
        late.shadow_commit,
        rival[0].shadow_commit,
        first.shadow_commit,
    ]


def test_snapshot_without_configured_identity(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty.gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)

    version = snapshot(repo, message="m")

    assert _git(repo, "log", "-1", "--format=%an <%ae> / %cn <%ce>", version.shadow_commit) == (
        "flor <flor@localhost> / flor <flor@localhost>"
    )


def test_snapshot_refuses_checked_out_shadow_branch(repo: Path) -> None:
    snapshot(repo, message="m")
    _git(repo, "checkout", "-q", SHADOW_BRANCH)

    with pytest.raises(GitError, match="is checked out"):
        snapshot(repo, message="m")


def test_snapshot_outside_git_raises(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="could not commit a code snapshot") as info:
        snapshot(tmp_path, message="m")
    assert info.value.__cause__ is not None


def test_snapshot_rejects_negative_size_limit(repo: Path) -> None:
    with pytest.raises(ConfigError, match="max_file_bytes"):
        snapshot(repo, message="m", max_file_bytes=-1)


def test_find_repo_root(repo: Path, tmp_path: Path) -> None:
    (repo / "sub").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    assert find_repo_root(repo / "sub") == repo.resolve()
    assert find_repo_root(outside) is None
    assert find_repo_root(tmp_path / "does-not-exist") is None
