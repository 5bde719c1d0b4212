"""Ray in tests: a fixture for commands that start their own local Ray, and the check that none of its processes
is left behind."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from recops.processes import command_line, marked


def ray_processes(ray_tmp: Path) -> list[str]:
    """Processes (other than this one) started under this test's RAY_TMPDIR: Ray passes its env to all of them."""
    return [f"{pid}: {command_line(pid, 100)}" for pid in marked(str(ray_tmp), "RAY_TMPDIR")]


RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_COLOR_PREFIX": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "CI": "1",
}


def assert_no_ray_left(ray_tmp: Path) -> None:
    deadline = time.monotonic() + 30
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ray_processes(ray_tmp)
    assert not left, f"Ray processes left behind: {left}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Ray settings for a command that starts its own local Ray; afterwards no process of that Ray may remain."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsw-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    for key, value in {**RAY_ENV, "RAY_TMPDIR": str(ray_tmp)}.items():
        monkeypatch.setenv(key, value)
    yield ray_tmp
    assert_no_ray_left(ray_tmp)
