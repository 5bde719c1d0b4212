"""Child processes that never outlive the command that started them.

Direct children ask the kernel for a parent-death signal (:func:`die_with_parent`). Process trees this process does
not start itself (a local Ray cluster: GCS, raylet, agents, workers) are tagged instead: :func:`reaped` marks every
process started inside it through an inherited environment variable, and a watchdog process, which also notes the
process trees of the children started inside it, SIGKILLs every marked or noted process once this one ends, normally
or killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1
REAP_ENV = "RECOPS_REAP"


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux), and exit at once if the parent
    (``parent_pid``, default: the current one) is already gone. Call it first thing in a child, or as a
    ``preexec_fn``."""
    expected = parent_pid or os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected:  # reparented: the parent died before the request was in place
        os._exit(1)


def _processes() -> dict[int, tuple[int, str]]:
    """Every live (not zombie) process: pid -> (parent pid, start time in clock ticks since boot)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    found[int(proc.name)] = (int(fields[1]), fields[19])
    return found


def _tree(roots: list[int], table: dict[int, tuple[int, str]]) -> list[int]:
    """``roots`` and all their descendants in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(roots)
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def descendants(pid: int) -> list[int]:
    """Live (not zombie) descendants of ``pid``: its children, their children, and so on."""
    return _tree([pid], _processes())[1:]


def living(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie is not)."""
    table = _processes()
    return [pid for pid in pids if pid in table]


def command_line(pid: int, limit: int = 120) -> str:
    """``pid``'s command line, cut to ``limit`` characters (empty once it is gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    return ""


def marked(token: str, variable: str = REAP_ENV) -> list[int]:
    """Live processes (other than this one) whose environment carries ``<variable>=<token>`` (a zombie's environment
    reads empty)."""
    entry = f"{variable}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if entry in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found


def reap(token: str, known: dict[int, str] | None = None, timeout_s: float = 10.0) -> None:
    """SIGKILL every process marked with ``token``, and every one of ``known`` (pid -> start time) still alive with
    the same start time, until none is left (or ``timeout_s`` passed)."""
    known = known or {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = _processes()
        left = set(marked(token)) | {pid for pid, start in known.items() if table.get(pid, (0, ""))[1] == start}
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def reaped(timeout_s: float = 30.0) -> Iterator[str]:
    """Mark every process started inside the block (and all their descendants, through the inherited environment);
    when the block ends, or this process dies in it, a watchdog SIGKILLs whichever of them is still alive. Yields the
    token. ``timeout_s``: how long the block's end waits for the watchdog."""
    token = f"{os.getpid()}-{secrets.token_hex(6)}"
    before = [pid for pid, (parent, _) in _processes().items() if parent == os.getpid()]  # e.g. a server
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "recops.processes", token, str(os.getpid()), *map(str, before)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C to the terminal's group reaches the command, not its watchdog
    )
    os.environ[REAP_ENV] = token
    try:
        yield token
    finally:
        os.environ.pop(REAP_ENV, None)
        watchdog.stdin.close()  # the watchdog's signal; a killed process closes it too
        watchdog.wait(timeout=timeout_s)


def _watch(token: str, owner: int, before: set[int], every_s: float = 0.5) -> None:
    """The watchdog: until ``owner`` closes the pipe (it ended or died), note the process trees of its children not
    in ``before`` (a process that rewrites its environment, e.g. to set its title, may no longer show the mark); then
    reap the marked and the noted processes."""
    known: dict[int, str] = {}
    while not select.select([sys.stdin], [], [], every_s)[0]:  # readable only at end of file: nothing is written
        table = _processes()
        roots = [pid for pid, (parent, _) in table.items() if parent == owner and pid not in before | {os.getpid()}]
        known.update({pid: table[pid][1] for pid in _tree(roots, table) if pid in table})
    reap(token, known)


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]), {int(pid) for pid in sys.argv[3:]})
