"""The one set of values every deployment manifest is rendered from (``recops manifests --values FILE``).

A values file is YAML with the keys of :class:`Values` (nested sections as mappings); keys left out keep
their defaults, an unknown key or a value of the wrong type is an error naming the file, the key and the
fix. ``deploy/values.yaml`` lists every key with its default.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from recops import __version__
from recops.errors import RecopsError

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")  # Kubernetes resource quantity
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_IMAGE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecopsError(message)


def _port(key: str, value: int) -> None:
    _check(0 < value < 65536, f"{key} must be a port number 1..65535, got {value}")


def _quantity(key: str, value: str) -> None:
    _check(
        bool(_QUANTITY.fullmatch(value)), f"{key} must be a Kubernetes quantity such as 4, 500m or 16Gi, got {value!r}"
    )


def _count(key: str, value: int) -> None:
    _check(value >= 0, f"{key} must be >= 0, got {value}")


def _under_runs(key: str, value: str) -> None:
    path = PurePosixPath(value)
    _check(
        bool(value) and not path.is_absolute() and ".." not in path.parts,
        f"{key} is a directory under `runs` and must be relative without '..', got {value!r}",
    )


@dataclass(frozen=True)
class TritonValues:
    """The Triton Deployment. Ports are Triton's own defaults (also Dockerfile.gpu's EXPOSE)."""

    gpus: int = 1
    models: tuple[str, ...] = ("dlrm",)  # loaded at start (--load-model); each must have a version already
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "1Gi"

    def __post_init__(self) -> None:
        from recops.serving.repository import validate_model_name

        for model in self.models:
            validate_model_name(model)
        for key in ("http_port", "grpc_port", "metrics_port"):
            _port(f"triton.{key}", getattr(self, key))
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        _check(len(set(ports)) == 3, f"triton ports must differ, got http/grpc/metrics {ports}")
        _count("triton.gpus", self.gpus)
        for key in ("cpu", "memory", "shm_size"):
            _quantity(f"triton.{key}", getattr(self, key))


@dataclass(frozen=True)
class LoopValues:
    """The closed loop (``recops loop --follow``) watching the served model, with its /metrics endpoint."""

    model: str = "dlrm"
    stream: str = "stream"  # under `runs`
    state_dir: str = "loop"  # under `runs`
    metrics_port: int = 9400
    gpus: int = 0
    cpu: str = "4"
    memory: str = "16Gi"

    def __post_init__(self) -> None:
        from recops.serving.repository import validate_model_name

        validate_model_name(self.model)
        _under_runs("loop.stream", self.stream)
        _under_runs("loop.state_dir", self.state_dir)
        _port("loop.metrics_port", self.metrics_port)
        _count("loop.gpus", self.gpus)
        _quantity("loop.cpu", self.cpu)
        _quantity("loop.memory", self.memory)


@dataclass(frozen=True)
class RayValues:
    """The KubeRay cluster the sweeps run on, and the sweep the RayJob starts."""

    workers: int = 2
    worker_gpus: int = 1
    worker_cpu: str = "8"
    worker_memory: str = "64Gi"
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    shm_size: str = "16Gi"
    sweep_config: str = "sweep_gpu.yaml"  # a config shipped in recops.configs, or a path to a sweep YAML

    def __post_init__(self) -> None:
        _count("ray.workers", self.workers)
        _count("ray.worker_gpus", self.worker_gpus)
        for key in ("worker_cpu", "worker_memory", "head_cpu", "head_memory", "shm_size"):
            _quantity(f"ray.{key}", getattr(self, key))


@dataclass(frozen=True)
class StorageValues:
    """The two PersistentVolumeClaims: the model repository and `runs` (datasets, registry, sweeps, loop)."""

    models_size: str = "20Gi"
    runs_size: str = "200Gi"
    access_mode: str = "ReadWriteMany"  # Triton, the loop and every Ray pod mount them at once
    storage_class: str | None = None  # None: the cluster's default StorageClass

    def __post_init__(self) -> None:
        _quantity("storage.models_size", self.models_size)
        _quantity("storage.runs_size", self.runs_size)
        modes = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod")
        _check(self.access_mode in modes, f"storage.access_mode must be one of {modes}, got {self.access_mode!r}")


@dataclass(frozen=True)
class MonitoringValues:
    """Scraping and alerting: the labels your Prometheus selects monitors by, and the alert thresholds."""

    labels: dict[str, str] = field(default_factory=lambda: {"release": "prometheus"})
    interval: str = "30s"
    auc_drop: float = 0.02  # alert when the online AUC falls this far below its maximum over auc_window
    auc_window: str = "1d"
    no_feedback_for: str = "30m"  # alert when windows with impressions have had no click this long
    triton_failure_ratio: float = 0.01
    triton_latency_ms: float = 50.0

    def __post_init__(self) -> None:
        for key in ("interval", "auc_window", "no_feedback_for"):
            _check(
                bool(re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", getattr(self, key))),
                f"monitoring.{key} must be a Prometheus duration such as 30s, 5m or 1d, got {getattr(self, key)!r}",
            )
        _check(0 < self.auc_drop < 1, f"monitoring.auc_drop must be in (0, 1), got {self.auc_drop}")
        _check(
            0 < self.triton_failure_ratio <= 1,
            f"monitoring.triton_failure_ratio must be in (0, 1], got {self.triton_failure_ratio}",
        )
        _check(self.triton_latency_ms > 0, f"monitoring.triton_latency_ms must be > 0, got {self.triton_latency_ms}")


@dataclass(frozen=True)
class Values:
    """Everything the manifests need; paths are inside the containers (the Dockerfile.gpu image)."""

    namespace: str = "recops"
    image: str = "recops"
    tag: str = __version__  # the image built from this recops
    uid: int = 1000  # the image's user (Dockerfile.gpu RECOPS_UID); also the pods' fsGroup
    model_repository: str = "/models"  # where the models PVC is mounted; Triton's --model-repository
    runs: str = "/workspace/runs"  # where the runs PVC is mounted
    triton: TritonValues = field(default_factory=TritonValues)
    loop: LoopValues = field(default_factory=LoopValues)
    ray: RayValues = field(default_factory=RayValues)
    storage: StorageValues = field(default_factory=StorageValues)
    monitoring: MonitoringValues = field(default_factory=MonitoringValues)

    def __post_init__(self) -> None:
        _check(
            bool(_DNS_LABEL.fullmatch(self.namespace)),
            f"namespace must be a DNS label (lower-case letters, digits, '-'), got {self.namespace!r}",
        )
        _check(
            bool(self.image) and not any(c.isspace() for c in self.image),
            f"image must be an image name without spaces, got {self.image!r}",
        )
        _check(
            bool(_IMAGE_TAG.fullmatch(self.tag)),
            f"tag {self.tag!r} is not a valid image tag: set `tag:` to the tag you built Dockerfile.gpu with",
        )
        _check(self.uid > 0, f"uid must be a non-root user id > 0, got {self.uid}")
        for key in ("model_repository", "runs"):
            _check(
                PurePosixPath(getattr(self, key)).is_absolute(),
                f"{key} is a path inside the containers and must be absolute, got {getattr(self, key)!r}",
            )

    @property
    def image_ref(self) -> str:
        return f"{self.image}:{self.tag}"


# ------------------------------------------------------------------------------------------------ loading


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _convert(kind: Any, value: Any, key: str) -> Any:
    """``value`` as the annotated type ``kind``, or RecopsError naming ``key``."""
    if is_dataclass(kind):
        return _build(kind, value, key)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecopsError(f"{key} must be a list, got {value!r}")
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecopsError(f"{key} must be a mapping, got {value!r}")
        return {_convert(args[0], k, f"{key} key"): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, accepted):
        raise RecopsError(f"{key} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})")
    return kind(value)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecopsError(f"{where or 'the values'} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise RecopsError(
            f"unknown key {where + '.' if where else ''}{unknown[0]}; known keys there: {', '.join(known)}"
        )
    prefix = f"{where}." if where else ""
    return cls(**{name: _convert(hints[name], value, prefix + name) for name, value in data.items()})


def load_values(path: Path | str | None = None) -> Values:
    """The values in YAML file ``path`` over the defaults; the defaults alone without a path."""
    if path is None:
        return Values()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise RecopsError(f"values file {path}: cannot read it ({exc.strerror}); pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise RecopsError(f"values file {path} is not valid YAML ({exc}); fix its syntax") from exc
    try:
        return _build(Values, data, "")
    except RecopsError as exc:
        raise RecopsError(f"values file {path}: {exc}; see deploy/values.yaml for every key and its type") from exc
