"""The core Kubernetes objects: the namespace, the two volumes, Triton and the closed loop."""

from __future__ import annotations

from pathlib import PurePosixPath

from recops.deploy.objects import (
    LOOP,
    MODELS_CLAIM,
    RUNS_CLAIM,
    SHM_MOUNT,
    TRITON,
    Object,
    claim_volumes,
    labels,
    metadata,
    pod_spec,
    recops_env,
    resources,
    selector,
    shm_volume,
    volume_mounts,
)
from recops.deploy.values import Values

# What the deployer (recops deploy, the loop) needs from Triton, as serving/server.py starts it locally:
# it loads and unloads versions itself, and one failed version load must not make the server unready.
DEPLOYER_FLAGS = ("--model-control-mode=explicit", "--strict-readiness=false")


def namespace(values: Values) -> list[Object]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": values.namespace, "labels": labels(values, "namespace")},
        }
    ]


def claims(values: Values) -> list[Object]:
    """The model repository's and the runs directory's PersistentVolumeClaims."""
    storage = values.storage

    def claim(name: str, component: str, size: str) -> Object:
        spec: Object = {"accessModes": [storage.access_mode], "resources": {"requests": {"storage": size}}}
        if storage.storage_class is not None:
            spec["storageClassName"] = storage.storage_class
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": metadata(values, name, component),
            "spec": spec,
        }

    return [claim(MODELS_CLAIM, "models", storage.models_size), claim(RUNS_CLAIM, "runs", storage.runs_size)]


def triton_args(values: Values) -> list[str]:
    """The tritonserver command line (the image's entrypoint runs it)."""
    t = values.triton
    return [
        "tritonserver",
        f"--model-repository={values.model_repository}",
        *DEPLOYER_FLAGS,
        f"--http-port={t.http_port}",
        f"--grpc-port={t.grpc_port}",
        f"--metrics-port={t.metrics_port}",
        "--exit-timeout-secs=10",
        *[f"--load-model={model}" for model in t.models],
    ]


def _http_probe(path: str, port: str, period_s: int, failures: int) -> Object:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "failureThreshold": failures}


def _deployment(values: Values, name: str, component: str, pod: Object) -> Object:
    """One replica, replaced (not rolled): GPUs are scarce and the loop's state directory has one writer."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(values, name, component),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(component)},
            "template": {"metadata": {"labels": labels(values, component)}, "spec": pod},
        },
    }


def _service(values: Values, name: str, component: str, ports: dict[str, int]) -> Object:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(values, name, component),
        "spec": {
            "selector": selector(component),
            "ports": [
                {"name": port, "port": number, "targetPort": port, "protocol": "TCP"} for port, number in ports.items()
            ],
        },
    }


def triton_ports(values: Values) -> dict[str, int]:
    t = values.triton
    return {"http": t.http_port, "grpc": t.grpc_port, "metrics": t.metrics_port}


def triton(values: Values) -> list[Object]:
    """Triton serving the model repository volume on GPUs, probed on its health endpoints, and its Service.

    One replica: with explicit model control the deployer loads versions on the server it talks to, so
    replicas behind one Service would serve different versions."""
    t = values.triton
    container = {
        "name": "triton",
        "image": values.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "args": triton_args(values),
        "ports": [
            {"name": port, "containerPort": number, "protocol": "TCP"} for port, number in triton_ports(values).items()
        ],
        "resources": resources(t.cpu, t.memory, t.gpus),
        "startupProbe": _http_probe("/v2/health/live", "http", 10, 60),  # --load-model loads before serving
        "livenessProbe": _http_probe("/v2/health/live", "http", 10, 3),
        "readinessProbe": _http_probe("/v2/health/ready", "http", 5, 3),
        "volumeMounts": [*volume_mounts(values, "models"), SHM_MOUNT],
    }
    pod = pod_spec(values, [container], [*claim_volumes("models"), shm_volume(t.shm_size)], t.gpus)
    return [_deployment(values, TRITON, "triton", pod), _service(values, TRITON, "triton", triton_ports(values))]


def loop_args(values: Values) -> list[str]:
    """``recops loop`` following the stream against the Triton Service, serving /metrics to the cluster."""
    loop, t = values.loop, values.triton
    runs = PurePosixPath(values.runs)
    return [
        "recops",
        "loop",
        "--state-dir",
        str(runs / loop.state_dir),
        "--stream",
        str(runs / loop.stream),
        "--name",
        loop.model,
        "--url",
        f"http://{TRITON}:{t.http_port}",
        "--metrics-url",
        f"http://{TRITON}:{t.metrics_port}/metrics",
        "--follow",
        "--metrics-port",
        str(loop.metrics_port),
        "--metrics-address",
        "0.0.0.0",
    ]


def loop(values: Values) -> list[Object]:
    """The closed loop (it writes new versions into the model repository volume Triton serves) and its Service."""
    loop_values = values.loop
    container = {
        "name": "loop",
        "image": values.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "args": loop_args(values),
        "env": recops_env(values),
        "ports": [{"name": "metrics", "containerPort": loop_values.metrics_port, "protocol": "TCP"}],
        "resources": resources(loop_values.cpu, loop_values.memory, loop_values.gpus),
        "readinessProbe": _http_probe("/metrics", "metrics", 10, 3),
        "volumeMounts": volume_mounts(values, "models", "runs"),
    }
    pod = pod_spec(values, [container], claim_volumes("models", "runs"), loop_values.gpus)
    return [
        _deployment(values, LOOP, "loop", pod),
        _service(values, LOOP, "loop", {"metrics": loop_values.metrics_port}),
    ]
