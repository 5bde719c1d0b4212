"""KubeRay: the Ray cluster sweeps run on, the sweep config it reads, and the RayJob that starts a sweep."""

from __future__ import annotations

import re
import shlex
from importlib import metadata as package_metadata
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from recops.deploy.objects import (
    RAY_CLUSTER,
    SHM_MOUNT,
    Object,
    claim_volumes,
    labels,
    locations,
    metadata,
    pod_spec,
    recops_env,
    resources,
    shm_volume,
    volume_mounts,
)
from recops.deploy.values import Values
from recops.errors import RecopsError

SWEEP_CONFIG_MAP = "recops-sweep-config"
SWEEP_DIR = "/etc/recops/sweep"
SWEEP_FILE = "sweep.yaml"
HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}  # Ray's defaults, which KubeRay expects


def ray_version() -> str:
    """The Ray version recops pins (its ``ray[tune]==X`` requirement), which the image installs."""
    try:
        requirements = package_metadata.requires("recops") or []
    except package_metadata.PackageNotFoundError as exc:
        raise RecopsError("recops is not installed, so its Ray pin is unknown: `pip install -e .` first") from exc
    for requirement in requirements:
        pinned = re.match(r"ray(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.]*)\s*$", requirement)
        if pinned:
            return pinned.group(2)
    raise RecopsError(f"recops' requirements pin no Ray version (ray==X): {requirements}")


def _sweep_source(name: str) -> Path:
    """A sweep YAML path, or the name of one shipped in recops.configs."""
    from recops.configs import config_path

    return Path(name) if Path(name).is_file() else config_path(name)


def sweep_config(values: Values) -> dict[str, Any]:
    """The sweep config with its dataset root and storage path on the runs volume (RECOPS_DATASETS, RECOPS_SWEEPS)."""
    source = _sweep_source(values.ray.sweep_config)
    try:
        config = yaml.safe_load(source.read_text())
    except yaml.YAMLError as exc:
        raise RecopsError(f"ray.sweep_config {source} is not valid YAML ({exc}); fix it or pick another") from exc
    if not isinstance(config, dict):
        raise RecopsError(f"ray.sweep_config {source} is not a sweep config mapping; see docs/sweeps.md")
    where = locations(values)
    if isinstance(config.get("dataset"), dict) and "root" in config["dataset"]:
        config["dataset"] = {**config["dataset"], "root": where["datasets"]}
    return {**config, "storage_path": where["sweeps"]}


def sweep_config_map(values: Values) -> list[Object]:
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(values, SWEEP_CONFIG_MAP, "ray"),
            "data": {SWEEP_FILE: yaml.safe_dump(sweep_config(values), sort_keys=False)},
        }
    ]


def _ray_pod(values: Values, container: str, cpu: str, memory: str, gpus: int, head: bool) -> Object:
    mounts = [*volume_mounts(values, "runs"), SHM_MOUNT]
    volumes = [*claim_volumes("runs"), shm_volume(values.ray.shm_size)]
    ray_container: Object = {
        "name": container,
        "image": values.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "env": recops_env(values),
        "resources": resources(cpu, memory, gpus),
    }
    if head:
        ray_container["ports"] = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS.items()]
        mounts.append({"name": "sweep-config", "mountPath": SWEEP_DIR, "readOnly": True})
        volumes.append({"name": "sweep-config", "configMap": {"name": SWEEP_CONFIG_MAP}})
    ray_container["volumeMounts"] = mounts
    return {"metadata": {"labels": labels(values, "ray")}, "spec": pod_spec(values, [ray_container], volumes, gpus)}


def ray_cluster(values: Values) -> list[Object]:
    """A head that schedules no trials (no CPUs or GPUs for Ray) and one fixed-size group of GPU workers."""
    ray = values.ray
    head = {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": _ray_pod(values, "ray-head", ray.head_cpu, ray.head_memory, 0, head=True),
    }
    worker = _ray_pod(values, "ray-worker", ray.worker_cpu, ray.worker_memory, ray.worker_gpus, head=False)
    workers = {
        "groupName": "gpu",
        "replicas": ray.workers,
        "minReplicas": ray.workers,
        "maxReplicas": ray.workers,
        "rayStartParams": {},
        "template": worker,
    }
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": metadata(values, RAY_CLUSTER, "ray"),
            "spec": {"rayVersion": ray_version(), "headGroupSpec": head, "workerGroupSpecs": [workers]},
        }
    ]


def sweep_entrypoint() -> str:
    """The sweep the RayJob runs on the cluster's head, attached to its Ray."""
    return shlex.join(["recops", "sweep", "--config", str(PurePosixPath(SWEEP_DIR, SWEEP_FILE)), "--address", "auto"])


def ray_job(values: Values) -> list[Object]:
    """A RayJob submitting the sweep to the RayCluster above (a new sweep: delete the finished RayJob, create it)."""
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": metadata(values, "recops-sweep", "ray"),
            "spec": {
                "clusterSelector": {"ray.io/cluster": RAY_CLUSTER},
                "entrypoint": sweep_entrypoint(),
                "submissionMode": "K8sJobMode",
            },
        }
    ]
