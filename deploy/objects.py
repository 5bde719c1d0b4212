"""Pieces every manifest shares: object names, labels, metadata, the recops environment, volumes, resources."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from recops.deploy.values import Values
from recops.settings import ENVIRONMENT

WORKDIR = "/workspace"  # Dockerfile.gpu's WORKDIR: relative default locations resolve against it
MODELS_CLAIM = "recops-models"
RUNS_CLAIM = "recops-runs"
TRITON = "recops-triton"
LOOP = "recops-loop"
RAY_CLUSTER = "recops-ray"
GPU = "nvidia.com/gpu"

Object = dict[str, Any]


def selector(component: str) -> dict[str, str]:
    """The labels a Service or ServiceMonitor selects ``component``'s pods or Service by."""
    return {"app.kubernetes.io/name": "recops", "app.kubernetes.io/component": component}


def labels(values: Values, component: str) -> dict[str, str]:
    return {
        **selector(component),
        "app.kubernetes.io/part-of": "recops",
        "app.kubernetes.io/version": values.tag,
        "app.kubernetes.io/managed-by": "recops-manifests",
    }


def metadata(values: Values, name: str, component: str, extra_labels: dict[str, str] | None = None) -> Object:
    return {
        "name": name,
        "namespace": values.namespace,
        "labels": {**labels(values, component), **(extra_labels or {})},
    }


def locations(values: Values) -> dict[str, str]:
    """recops.settings' default locations inside the containers: the model repository where its volume is
    mounted, the defaults under ``runs/`` on the runs volume, anything else under the image's WORKDIR."""
    found = {}
    for setting, (_, default) in ENVIRONMENT.items():
        path = PurePosixPath(default)
        if setting == "model_repository":
            found[setting] = values.model_repository
        elif path.parts[0] == "runs":
            found[setting] = str(PurePosixPath(values.runs, *path.parts[1:]))
        else:
            found[setting] = str(PurePosixPath(WORKDIR, path))
    return found


def recops_env(values: Values) -> list[Object]:
    """One RECOPS_* variable per setting, so every recops command in a pod agrees on where things are."""
    where = locations(values)
    return [{"name": variable, "value": where[setting]} for setting, (variable, _) in ENVIRONMENT.items()]


def volume_mounts(values: Values, *volumes: str) -> list[Object]:
    """Mounts of the claims' volumes ("models", "runs") where the values put them."""
    paths = {"models": values.model_repository, "runs": values.runs}
    return [{"name": name, "mountPath": paths[name]} for name in volumes]


def claim_volumes(*volumes: str) -> list[Object]:
    claims = {"models": MODELS_CLAIM, "runs": RUNS_CLAIM}
    return [{"name": name, "persistentVolumeClaim": {"claimName": claims[name]}} for name in volumes]


def shm_volume(size: str) -> Object:
    """A memory-backed /dev/shm: the container runtime's 64 MB default is too small for NCCL, Ray and Triton."""
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def resources(cpu: str, memory: str, gpus: int) -> Object:
    """Requests for CPU and memory; a memory limit; GPUs as a limit (extended resources are not overcommitted)."""
    limits = {"memory": memory, **({GPU: str(gpus)} if gpus else {})}
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}


def pod_spec(values: Values, containers: list[Object], volumes: list[Object], gpus: int) -> Object:
    """A pod running as the image's user, tolerating the usual GPU-node taint when it asks for GPUs."""
    spec: Object = {
        "securityContext": {"runAsUser": values.uid, "runAsNonRoot": True, "fsGroup": values.uid},
        "containers": containers,
        "volumes": volumes,
    }
    if gpus:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return spec
