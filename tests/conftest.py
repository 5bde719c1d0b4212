"""Session-wide settings and shared fixtures: quiet, bounded Ray; a tiny synthetic dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_MARK = f"RECOPS_TEST_SESSION={os.getpid()}"
os.environ["RECOPS_TEST_SESSION"] = str(os.getpid())  # inherited by every process the tests start

_TMP = Path(tempfile.mkdtemp(prefix="recops-tests-"))
for key, value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TMPDIR": str(_TMP / "ray"),
    "RAY_COLOR_PREFIX": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RECOPS_REGISTRY": str(_TMP / "registry"),
    "PYTHONWARNINGS": "ignore",
}.items():
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]


def recops(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (`python -m recops.cli ...`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "recops.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"recops {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """20k synthetic Criteo rows with their true probabilities."""
    from recops.training.synth import SynthConfig, write

    out = tmp_path_factory.mktemp("synth")
    write(SynthConfig(rows=20_000, seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(synth_dir, tmp_path_factory):
    """The 20k rows ingested with 1000-bucket tables (a few seconds)."""
    from recops.training.dataset import ingest
    from recops.training.spec import PreprocessConfig

    return ingest(
        [synth_dir / "data.tsv"], tmp_path_factory.mktemp("datasets"), config=PreprocessConfig(table_size=1000)
    )


def _session_processes() -> list[tuple[int, str]]:
    """Processes other than pytest itself that inherited this session's marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if SESSION_MARK.encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except OSError:
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test left a process (Triton, stubs, Ray) behind, and clean them up."""
    # pytest's own multiprocessing resource tracker ends with pytest; anything else is a leak.
    leftovers = [p for p in _session_processes() if "pytest" not in p[1] and "resource_tracker" not in p[1]]
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if leftovers:
        print(f"\nERROR: tests left {len(leftovers)} processes behind (killed now):")
        for pid, cmd in leftovers[:20]:
            print(f"  {pid} {cmd}")
        session.exitstatus = 1
