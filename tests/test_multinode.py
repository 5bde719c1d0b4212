"""Sweeps on a real multi-node Ray cluster on this machine (``recops.bench.local_cluster``): a head ``node_a`` and a
worker node ``node_b``, each a separate ``ray start`` with 1 CPU and a custom resource named after it. Trials land on
both nodes whether the sweep attaches to the GCS, comes through Ray Client (``ray://``) or runs as a Ray job; a
custom resource pins trials to one node; a two-worker trial's DMP group spans both nodes; a trial whose node is lost
resumes from its checkpoint on the other. Each run is bounded; the fixture stops the cluster and asserts that no
process of it is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from recops.bench.local_cluster import LocalCluster, local_cluster
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import ingest
from recops.training.spec import PreprocessConfig
from recops.training.synth import SynthConfig, write

REPO = Path(__file__).resolve().parents[1]
NODES = {"node_a": 1, "node_b": 1}  # name -> CPUs; the first is the head
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "CI": "1"}
SWEEP_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multinode-data")
    write(SynthConfig(rows=4000, seed=5), root / "raw")
    return ingest([root / "raw" / "data.tsv"], root / "versions", config=PreprocessConfig(table_size=300)).path


@pytest.fixture(scope="module")
def cluster() -> Any:
    with local_cluster(NODES, dashboard=True, env={"CI": "1"}) as running:
        yield running
    assert not running.processes(), "local_cluster stops every process of the cluster"


@pytest.fixture
def nodes(cluster: LocalCluster) -> dict[str, str]:
    """Node name -> node id, every node of NODES alive (one a previous test killed is started again)."""
    for name, cpus in NODES.items():
        if name not in cluster.nodes():
            cluster.start(name, cpus)
    return cluster.nodes()


def sweep_yaml(tmp_path: Path, dataset: Path, storage: str | None = None, **overrides: Any) -> Path:
    config = {
        "name": "mn",
        "dataset": str(dataset),
        "model": {"embedding_dim": 8, "dense_arch": [16], "over_arch": [16]},
        "train": {"batch_size": 256},
        "search": {"embedding_lr": {"grid": [0.02, 0.1]}},
        "epochs": 1,
        "num_samples": 1,
        "scheduler": "fifo",
        "max_concurrent_trials": 2,
        "storage_path": storage or str(tmp_path / "sweeps"),
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_command(config: Path, tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "recops.cli",
        "sweep",
        "--config",
        str(config),
        "--registry",
        str(tmp_path / "reg"),
        "--no-register",
        "--json",
        *args,
    ]


def last_json(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, output[-3000:]
    return json.loads(lines[-1])


def run_cli(config: Path, tmp_path: Path, address: str) -> dict[str, Any]:
    done = subprocess.run(
        sweep_command(config, tmp_path, "--address", address),
        cwd=REPO,
        env={**os.environ, **DRIVER_ENV},
        capture_output=True,
        text=True,
        timeout=SWEEP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return last_json(done.stdout)


def run_job(config: Path, tmp_path: Path, cluster: LocalCluster) -> dict[str, Any]:
    """The sweep as a Ray job: its driver runs on the head and attaches through $RAY_ADDRESS."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(entrypoint=" ".join(sweep_command(config, tmp_path)))
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still running after {SWEEP_TIMEOUT_S} s: {client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    return last_json(logs)


def records(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    experiment = Path(out["experiment_dir"])
    return {p.parent.name: json.loads(p.read_text()) for p in experiment.glob("trials/*/trial_record.json")}


def attempt_nodes(record: dict[str, Any]) -> list[list[str]]:
    """Per attempt of a trial, the node id of each of its ranks (from its "start" events)."""
    return [[n["node_id"] for n in attempt["nodes"]] for attempt in record["attempts"]]


@pytest.mark.parametrize("via", ["ray_client", "job"])
def test_trials_run_on_both_nodes(
    via: str, tmp_path: Path, dataset: Path, cluster: LocalCluster, nodes: dict[str, str]
) -> None:
    """Two 1-CPU trials at once on two 1-CPU nodes: one on each, through Ray Client or as a Ray job (attaching to the
    GCS: the lost-node test), with the storage given as a file:// URI."""
    config = sweep_yaml(tmp_path, dataset, f"file://{tmp_path}/shared")
    out = run_job(config, tmp_path, cluster) if via == "job" else run_cli(config, tmp_path, cluster.client_address)
    assert (out["status"], out["num_trials"], out["num_errors"]) == ("completed", 2, 0)
    assert Path(out["experiment_dir"]).parent == tmp_path / "shared"
    found = records(out)
    assert {r["status"] for r in found.values()} == {"finished"}
    placed = sorted(attempt_nodes(r)[0][0] for r in found.values())
    assert placed == sorted(nodes.values()), (placed, nodes)
    assert Checkpoint.open(out["best_checkpoint"]).meta.world_size == 1


def test_a_custom_resource_pins_trials_to_its_node(
    tmp_path: Path, dataset: Path, cluster: LocalCluster, nodes: dict[str, str]
) -> None:
    """Workers asking for node_b's resource run there only (one at a time: the node has one), in one reused trial
    process."""
    config = sweep_yaml(tmp_path, dataset, resources={"custom_per_worker": {"node_b": 1}})
    out = run_cli(config, tmp_path, cluster.address)
    assert (out["status"], out["num_trials"], out["num_errors"]) == ("completed", 2, 0)
    attempts = [a for r in records(out).values() for a in r["attempts"]]
    assert {a["nodes"][0]["node_id"] for a in attempts} == {nodes["node_b"]}
    assert len({a["pid"] for a in attempts}) == 1, attempts  # the second trial reused the first one's process


@pytest.mark.slow
def test_a_two_worker_trial_spans_both_nodes(
    tmp_path: Path, dataset: Path, cluster: LocalCluster, nodes: dict[str, str]
) -> None:
    """A Ray Train worker group of 2 placed STRICT_SPREAD: rank 0 and rank 1 on different nodes, one table-wise
    sharded DMP model over gloo between them."""
    config = sweep_yaml(
        tmp_path,
        dataset,
        search={"embedding_lr": {"grid": [0.05]}},
        resources={"workers_per_trial": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"},
    )
    out = run_cli(config, tmp_path, cluster.address)
    assert (out["status"], out["num_trials"], out["num_errors"]) == ("completed", 1, 0)
    (record,) = records(out).values()
    (ranks,) = attempt_nodes(record)
    assert sorted(ranks) == sorted(nodes.values()), (ranks, nodes)
    assert record["status"] == "finished" and record["attempts"][0]["world_size"] == 2
    assert Checkpoint.open(out["best_checkpoint"]).meta.world_size == 2


def events(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "work" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_trial_on_a_lost_node_resumes_on_the_other(
    tmp_path: Path, dataset: Path, cluster: LocalCluster, nodes: dict[str, str]
) -> None:
    """A sweep attached to the GCS runs one trial on each node; node_b dies (all its processes SIGKILLed) after its
    trial committed epoch 1: Tune restarts that trial on node_a from its last checkpoint once node_a is free, and the
    sweep ends without errors."""
    config = sweep_yaml(tmp_path, dataset, epochs=8, max_failures=1, train={"batch_size": 256, "patience": 100})
    sweep = subprocess.Popen(
        sweep_command(config, tmp_path, "--address", cluster.address),
        cwd=REPO,
        env={**os.environ, **DRIVER_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lost = None
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while lost is None and time.monotonic() < deadline and sweep.poll() is None:
            for trial in (tmp_path / "sweeps").glob("*/trials/*"):
                log = events(trial)
                starts = [e for e in log if e["event"] == "start" and e["nodes"][0]["node_id"] == nodes["node_b"]]
                if starts and any(e["event"] == "epoch" for e in log):
                    cluster.kill("node_b")
                    lost = trial.name
            time.sleep(0.02)
        stdout, err = sweep.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        sweep.kill()
    assert lost and sweep.returncode == 0, err[-3000:]
    out = last_json(stdout)
    assert (out["status"], out["num_trials"], out["num_errors"]) == ("completed", 2, 0)
    found = records(out)
    record, (other,) = found.pop(lost), found.values()
    assert attempt_nodes(other) == [[nodes["node_a"]]]
    assert record["status"] == other["status"] == "finished"
    assert [h["epoch"] for h in record["history"]] == list(range(1, 9))
    first, second = record["attempts"]
    assert attempt_nodes(record) == [[nodes["node_b"]], [nodes["node_a"]]]
    assert second["resumed_at_epoch"] >= 1 and second["pid"] != first["pid"]
