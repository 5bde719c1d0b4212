"""Atomic writes: a file or directory appears whole or not at all.

Everything is written to a temporary path in the target's own directory and renamed onto it. Temporary
names carry the writer's pid (``.<name>.tmp-<pid>-<random>``), so :func:`remove_stale` can tell the
leftovers of a killed process from the work of a live one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_NAME = re.compile(r"\..+\.tmp-(\d+)-[^/]*")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file path beside ``path``: renamed onto ``path`` when the block ends normally, deleted
    when it raises. The block writes the file (by name, e.g. ``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; ``fsync`` makes it durable before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode(), fsync)


def write_json_atomic(path: str | Path, data: Any, fsync: bool = False, indent: int | None = 1) -> Path:
    """``data`` as JSON (paths and other objects as strings) written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str), fsync)


@contextlib.contextmanager
def staging_dir(final: str | Path) -> Iterator[Path]:
    """A new empty directory beside ``final`` to assemble it in; deleted when the block ends unless the block
    renamed it (onto ``final``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final)))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_dir(directory: str | Path, name: str) -> Path:
    """A new directory in ``directory`` named like this process's temporary files for ``name`` (so that once this
    process is gone, :func:`remove_stale` removes it)."""
    return Path(tempfile.mkdtemp(dir=directory, prefix=_temp_prefix(Path(directory) / name)))


def remove_stale(directory: str | Path, name: str = "") -> list[Path]:
    """Delete the temporary files and directories in ``directory`` (only those for ``name``, if given) whose writer
    process is gone; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if name and not entry.name.startswith(f".{name}.tmp-"):
            continue
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
