"""A multi-node Ray cluster on one machine, for the multi-node tests and benchmark.

Each node is its own ``ray start`` (the head with the GCS, the Ray Client server and optionally the dashboard with
the Job API; workers attached to it) with its own CPUs and a custom resource named after the node (``{"node_a": 1}``),
so work can be pinned to a node and a node recognised in ``ray.nodes()``. Every process of a node carries
``RECOPS_RAY_NODE=<cluster dir>/<node>`` in its environment: that is how a node is killed (a lost machine: all its
processes SIGKILLed at once) and how the cluster is checked to be gone, without touching other Ray processes of the
machine (``ray stop`` would end them all).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NODE_MARKER = "RECOPS_RAY_NODE"
PORTS_PER_NODE = 200  # worker ports of one node; nodes get disjoint ranges
NODE_ENV = {  # every node: no auth token file, no usage stats, Ray Train settings of recops' local sweeps
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "120",
    # The GCS declares a silent node dead after ~1.5 s instead of ~15 s (Ray's defaults suit real networks).
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(prefix: str) -> dict[int, str]:
    """pid -> marker of every process whose environment has a ``NODE_MARKER`` starting with ``prefix``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            entries = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(f"{NODE_MARKER}={prefix}".encode()):
                found[int(proc.name)] = entry.split(b"=", 1)[1].decode()
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class LocalCluster:
    """Nodes started with :meth:`start`, lost with :meth:`kill`, all ended with :meth:`stop`."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, dashboard: bool = False):
        self.root = root  # Ray's temp dir: short, Ray's socket paths are length-limited
        self.env = {**os.environ, **NODE_ENV, **(env or {}), "RAY_TMPDIR": str(root)}
        self.dashboard = dashboard
        self.port, self.client_port, self.dashboard_port = free_port(), free_port(), free_port()
        self._worker_ports = random.randrange(20000, 26000, PORTS_PER_NODE)  # below the ephemeral range
        self.started: list[str] = []  # node names, in order (restarts included)

    @property
    def address(self) -> str:
        """The GCS address drivers on this machine attach to (``--address``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def marker(self, name: str) -> str:
        return f"{self.root}/{name}"

    def start(self, name: str, cpus: int = 1) -> None:
        """Start node ``name`` (the first one is the head) with ``cpus`` CPUs and the resource ``{name: 1}``."""
        low = self._worker_ports + PORTS_PER_NODE * len(self.started)
        args = [
            f"--num-cpus={cpus}",
            f"--resources={json.dumps({name: 1})}",
            "--object-store-memory=100000000",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + PORTS_PER_NODE - 1}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]
        if self.started:
            args.append(f"--address={self.address}")
        else:
            args += [
                "--head",
                f"--port={self.port}",
                f"--temp-dir={self.root}",
                f"--ray-client-server-port={self.client_port}",
                f"--include-dashboard={str(self.dashboard).lower()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
            ]
        env = {**self.env, NODE_MARKER: self.marker(name)}
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"ray start of node {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        self.started.append(name)
        self.wait_for(name)

    def nodes(self) -> dict[str, str]:
        """Alive nodes: name -> Ray node id."""
        with self.driver():
            import ray

            alive = [n for n in ray.nodes() if n.get("Alive")]
        return {name: n["NodeID"] for n in alive for name in set(self.started) & set(n["Resources"])}

    def wait_for(self, name: str, timeout_s: float = 60) -> str:
        """The node id of ``name`` once the GCS lists it alive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.nodes().get(name)
            if found:
                return found
            time.sleep(0.5)
        raise TimeoutError(f"node {name} did not join the cluster at {self.address} within {timeout_s:g} s")

    @contextlib.contextmanager
    def driver(self) -> Iterator[Any]:
        """This process attached to the cluster as a Ray driver, detached afterwards."""
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as on the nodes
        ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
        try:
            yield ray
        finally:
            ray.shutdown()

    def processes(self, name: str = "") -> dict[int, str]:
        """pid -> node of the live processes of node ``name`` (all nodes if empty)."""
        return _marked(self.marker(name) if name else f"{self.root}/")

    def kill(self, name: str, timeout_s: float = 30) -> None:
        """Lose node ``name``: SIGKILL all its processes at once, as when a machine dies."""
        marker = self.marker(name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = [pid for pid, node in self.processes(name).items() if node == marker]
            if not pids:
                return
            _signal_all(pids, signal.SIGKILL)
            time.sleep(0.2)
        raise TimeoutError(f"processes of node {name} survive SIGKILL: {self.processes(name)}")

    def stop(self, grace_s: float = 2, timeout_s: float = 30) -> dict[int, str]:
        """End every process of the cluster (SIGTERM, then SIGKILL after ``grace_s``); the ones left (should be
        none)."""
        _signal_all(list(self.processes()), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.3)
        deadline = time.monotonic() + timeout_s
        while self.processes() and time.monotonic() < deadline:
            _signal_all(list(self.processes()), signal.SIGKILL)
            time.sleep(0.3)
        return self.processes()


@contextlib.contextmanager
def local_cluster(
    nodes: dict[str, int], dashboard: bool = False, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """A running cluster of ``nodes`` (name -> CPUs, the first is the head), stopped and removed afterwards;
    RuntimeError if a process of it is left."""
    root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))
    cluster = LocalCluster(root, env, dashboard)
    try:
        for name, cpus in nodes.items():
            cluster.start(name, cpus)
        yield cluster
    finally:
        left = cluster.stop()
        if not left:
            shutil.rmtree(root, ignore_errors=True)
    if left:
        raise RuntimeError(f"Ray processes of the cluster in {root} left behind: {left}")
