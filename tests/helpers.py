"""Small helpers shared by the tests (no fixtures: those live in conftest.py)."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any


def git(cwd: Path, *args: str) -> str:
    """Run git in ``cwd`` and return its stripped output."""
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def user_git_state(root: Path) -> tuple[str, str, str, bytes]:
    """HEAD, branch, ``git status --porcelain`` and the index bytes, read without refreshing the index."""
    head = git(root, "rev-parse", "HEAD")
    branch = git(root, "symbolic-ref", "-q", "HEAD")
    status = git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=all")
    return head, branch, status, (root / ".git" / "index").read_bytes()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` on the sqlite file ``db``, read-only, as dicts."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        cur = conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        conn.close()


def make_venv(path: Path) -> Path:
    """A real virtualenv at ``path`` (``python -m venv --without-pip``); returns its site-packages folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
    [site] = path.glob("lib/python*/site-packages")
    return site
