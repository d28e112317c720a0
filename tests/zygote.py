"""A fork server for tests that kill or race real recording processes.

Starting Python with torch and Lightning costs several seconds here, which would make 20 kills
take minutes. The server (``python zygote.py``) imports them once, then forks one child per
request: every child is a real process with its own pid, its own threads, sqlite connections
and git subprocesses, killed with a real SIGKILL, but it starts in milliseconds. No torch
operation runs in the server before a fork, so no thread pool is inherited half-made.

Protocol: the client writes one JSON request per line to the server's stdin
(``{"op": "fork", ...}`` or ``{"op": "wait", "pid": N}``); the server answers ``R <json>``
lines on its stdout, and children write ``E <pid> <text>`` event lines to the same pipe
(one ``os.write`` each, below PIPE_BUF, so lines from several threads never interleave).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


# ---- server side (runs in the zygote process and its children) -------------------------------------


def _send(fd: int, line: str) -> None:
    os.write(fd, (line.rstrip("\n") + "\n").encode())


def _child(request: dict[str, Any], fd: int) -> None:
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        import workers

        pid = os.getpid()
        workers.emit = lambda text: _send(fd, f"E {pid} {text}")
        getattr(workers, request["target"])(**request["kwargs"])
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import workers  # noqa: F401  (the expensive imports, done once)

    fd = os.dup(1)
    _send(fd, "R " + json.dumps({"op": "ready"}))
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "fork":
            pid = os.fork()
            if pid == 0:
                _child(request, fd)
            _send(fd, "R " + json.dumps({"op": "forked", "pid": pid}))
        elif request["op"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            signalled = os.WIFSIGNALED(status)
            reply = {"op": "waited", "pid": request["pid"], "signal": os.WTERMSIG(status) if signalled else None}
            reply["code"] = None if signalled else os.WEXITSTATUS(status)
            _send(fd, "R " + json.dumps(reply))


# ---- client side (runs in pytest) -----------------------------------------------------------------


@dataclass
class Exit:
    """How a child ended: killed by ``signal``, or exited with ``code``."""

    signal: int | None
    code: int | None


@dataclass
class Child:
    """A forked child: its pid, log file and the events it has written so far."""

    pid: int
    log: Path
    events: list[str] = field(default_factory=list)
    exit: Exit | None = None

    @property
    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.exit is None and _alive(self.pid)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"


class Zygote:
    """Client of a fork server; see the module docstring."""

    def __init__(self, stderr_path: Path) -> None:
        self._stderr = stderr_path.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, str(HERE / "zygote.py")],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._cond = threading.Condition()
        self._replies: list[dict[str, Any]] = []
        self._children: dict[int, Child] = {}
        self._orphans: dict[int, list[str]] = {}  # events read before the fork reply named the child
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._reply("ready", timeout=120)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                if line.startswith("R "):
                    self._replies.append(json.loads(line[2:]))
                elif line.startswith("E "):
                    _, pid, text = line.split(" ", 2)
                    child = self._children.get(int(pid))
                    (child.events if child else self._orphans.setdefault(int(pid), [])).append(text)
                self._cond.notify_all()
        with self._cond:
            self._replies.append({"op": "eof"})
            self._cond.notify_all()

    def _request(self, request: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(request) + "\n").encode())
        self._proc.stdin.flush()

    def _reply(self, op: str, timeout: float) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: bool(self._replies), timeout)
            if not ok:
                raise TimeoutError(f"the fork server gave no {op!r} reply within {timeout} s")
            reply = self._replies.pop(0)
        if reply["op"] != op:
            raise RuntimeError(f"the fork server answered {reply} instead of {op!r}; see {self._stderr.name}")
        return reply

    def fork(self, target: str, *, cwd: Path, log: Path, argv: list[str] | None = None, **kwargs: Any) -> Child:
        """Start ``workers.<target>(**kwargs)`` in a new child with this process's environment."""
        argv = argv or [str(cwd / "train.py")]
        request = {"op": "fork", "target": target, "kwargs": kwargs, "argv": argv}
        self._request({**request, "cwd": str(cwd), "env": dict(os.environ), "log": str(log)})
        pid = self._reply("forked", timeout=30)["pid"]
        with self._cond:
            child = self._children[pid] = Child(pid, log, self._orphans.pop(pid, []))
        return child

    def wait_event(self, child: Child, match: Callable[[str], bool], timeout: float, start: int = 0) -> int | None:
        """Index of the first event of ``child`` from ``start`` on that ``match``es, or None once
        ``timeout`` passes or the child has ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(child.events)):
                    if match(child.events[i]):
                        return i
                start = len(child.events)
                left = deadline - time.monotonic()
                if left <= 0 or not _alive(child.pid):
                    return None
                self._cond.wait(min(left, 0.5))

    def kill(self, child: Child) -> Exit:
        """SIGKILL ``child`` and reap it (after which its pid no longer exists)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        return self.wait(child, timeout=30)

    def wait(self, child: Child, timeout: float) -> Exit:
        """Wait for ``child`` to end; SIGKILL it after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(child.pid):  # ended; the server reaps it below
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        self._request({"op": "wait", "pid": child.pid})
        reply = self._reply("waited", timeout=30)
        with self._cond:  # every event the child wrote precedes the reply in the pipe
            child.exit = Exit(reply["signal"], reply["code"])
        return child.exit

    def close(self) -> None:
        for child in self._children.values():
            if child.exit is None:
                with contextlib.suppress(Exception):
                    self.kill(child)
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def running(stderr_path: Path) -> Iterator[Zygote]:
    zygote = Zygote(stderr_path)
    try:
        yield zygote
    finally:
        zygote.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    serve()
