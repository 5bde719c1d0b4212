"""The sweep YAML, parsed into dataclasses and checked before any Ray process starts.

Example (every key but ``dataset`` and ``search`` is optional)::

    name: demo
    dataset: {root: runs/data, version: latest}    # or a version directory: runs/data/3221ca64b863
    model: {family: dlrm, embedding_dim: 8}        # fixed architecture (training.model.ModelConfig fields)
    train: {batch_size: 512}                       # fixed optimisation settings (training.train.TrainConfig fields)
    search:                                        # Tune distributions over model/train fields
      embedding_lr: {loguniform: [0.01, 0.2]}
      family: {choice: [dlrm, dcn]}
      dense_arch: {grid: [[16], [32, 16]]}
    epochs: 2
    num_samples: 4
    metric: auc                                    # auc (max) or logloss (min)
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or: fifo
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
                                                   # also custom_per_worker: {gpu_pool: 1}, placement_strategy: PACK
    max_concurrent_trials: 2                       # default: as many trials as the cluster fits
    max_failures: 1
    storage_path: runs/sweeps                      # or file:///mnt/shared/sweeps (every node's mount)
    time_limit_s: 0                                # 0 = no limit

Relative paths are resolved against the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.settings import settings
from recops.training.config import CPU_SHARDING_TYPES, ModelConfig, TrainConfig
from recops.training.dataset import Dataset, DatasetRef

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}
METRICS = {"auc": "max", "logloss": "min"}
SCHEDULERS = ("asha", "fifo")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups'
# Set by the sweep itself, not searchable: epochs (top level), device and threads (from the resources).
RESERVED_TRAIN_FIELDS = ("epochs", "device", "threads")
MODEL_ONLY_FIELDS = ("tables", "num_dense")


def model_fields() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_ONLY_FIELDS}


def _train_fields() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in RESERVED_TRAIN_FIELDS}


def _check_keys(where: str, data: Any, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecopsError(f"sweep config: {where} must be a mapping, got {type(data).__name__} ({data!r})")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecopsError(f"sweep config: unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise RecopsError(f"sweep config: {where} is missing {missing}")
    return data


@dataclass(frozen=True)
class Distribution:
    """One search dimension: ``kind`` in DISTRIBUTIONS with its arguments (bounds or values)."""

    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, name: str, spec: Any) -> Distribution:
        kinds = ", ".join(f"{{{k}: [...]}}" for k in DISTRIBUTIONS)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise RecopsError(
                f"sweep config: search.{name} must be one distribution such as {kinds}; got {spec!r} "
                "(fixed values go under model: or train:)"
            )
        kind, args = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            raise RecopsError(
                f"sweep config: search.{name}: unknown distribution {kind!r}; use one of {list(DISTRIBUTIONS)}"
            )
        if not isinstance(args, list) or not args:
            raise RecopsError(f"sweep config: search.{name}: {kind} takes a non-empty list, got {args!r}")
        arity = DISTRIBUTIONS[kind]
        if arity is not None:
            if len(args) != arity or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise RecopsError(f"sweep config: search.{name}: {kind} takes [low, high] numbers, got {args!r}")
            low, high = args
            if not low < high:
                raise RecopsError(f"sweep config: search.{name}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise RecopsError(f"sweep config: search.{name}: loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise RecopsError(f"sweep config: search.{name}: randint takes integers [low, high) , got {args!r}")
        return cls(kind, tuple(args))

    def candidates(self) -> list[Any]:
        """Values that bound what this dimension can produce (all values of a choice/grid, the ends of a range)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [float(a) for a in self.args]  # (log)uniform samples floats even between integer bounds

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def to_dict(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.args)}


def parse_dataset(spec: Any) -> DatasetRef:
    """``dataset:`` of a sweep: a version directory (a string or ``{path: DIR}``) or ``{root: DIR, version: ID}``
    (``latest`` = the newest version under the root)."""
    if isinstance(spec, str):
        spec = {"path": spec}
    spec = _check_keys("dataset", spec, {"path", "root", "version"})
    try:
        if "path" in spec:
            if "root" in spec:
                raise RecopsError("dataset takes either path or root + version, not both")
            dataset = Dataset.open(spec["path"])
            if spec.get("version", dataset.version) != dataset.version:
                raise RecopsError(f"dataset {dataset.path} holds version {dataset.version}, not {spec['version']!r}")
        elif set(spec) == {"root", "version"}:
            dataset = Dataset.resolve(spec["root"], str(spec["version"]))
        else:
            raise RecopsError("dataset needs path, or root and version (version may be 'latest')")
    except RecopsError as exc:
        raise RecopsError(f"sweep config: {exc}") from exc
    return dataset.ref


def parse_storage_path(spec: str | Path) -> Path:
    """``storage_path``: a directory, or its ``file://`` URI (``file:///mnt/shared/sweeps``). Every Ray node and the
    driver read and write it, so on a cluster it must be a path they all mount (NFS, a PVC; S3 or GCS through a mount
    such as mountpoint-s3 or gcsfuse)."""
    spec = str(spec)
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    if not scheme:
        return Path(spec).expanduser().resolve()
    if scheme != "file":
        raise RecopsError(
            f"sweep config: storage_path {spec}: trials and the driver share the experiment directory as files "
            f"(events, checkpoints, records), which {scheme}:// cannot hold; mount the bucket on every node and the "
            "driver at the same path (mountpoint-s3, gcsfuse) and pass that path or its file:// URI"
        )
    from pyarrow import fs

    try:
        _, path = fs.FileSystem.from_uri(spec)
    except (ValueError, OSError) as exc:
        raise RecopsError(
            f"sweep config: storage_path {spec}: not a file URI ({exc}); use file:///absolute/path"
        ) from exc
    return Path(path).resolve()


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    @classmethod
    def parse(cls, spec: Any, epochs: int) -> SchedulerConfig:
        if isinstance(spec, str):
            spec = {"type": spec}
        spec = _check_keys("scheduler", spec, {f.name for f in dataclasses.fields(cls)})
        config = cls(**spec)
        if config.type not in SCHEDULERS:
            raise RecopsError(f"sweep config: scheduler type {config.type!r} not in {list(SCHEDULERS)}")
        if not 1 <= config.grace_period <= epochs or config.reduction_factor <= 1:
            raise RecopsError(
                f"sweep config: scheduler needs 1 <= grace_period <= epochs ({epochs}) and reduction_factor > 1"
            )
        return config


@dataclass(frozen=True)
class TrialResources:
    """Each trial has this many workers (one DMP rank each): one trains in the Tune trial itself, several form a Ray
    Train worker group placed by ``placement_strategy``. ``custom_per_worker`` asks for custom Ray resources (a node
    started with ``--resources '{"gpu_pool": 4}'``), which pins the workers to the nodes that have them."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom_per_worker: dict[str, float] = field(default_factory=dict)
    placement_strategy: str = "PACK"

    @classmethod
    def parse(cls, spec: Any) -> TrialResources:
        spec = _check_keys("resources", spec, {f.name for f in dataclasses.fields(cls)})
        config = cls(**spec)
        if not isinstance(config.workers_per_trial, int) or config.workers_per_trial < 1:
            raise RecopsError(
                f"sweep config: resources.workers_per_trial must be an integer >= 1, got {config.workers_per_trial!r}"
            )
        if not config.cpus_per_worker > 0 or config.gpus_per_worker < 0:
            raise RecopsError("sweep config: resources need cpus_per_worker > 0 and gpus_per_worker >= 0")
        custom = config.custom_per_worker
        if not isinstance(custom, dict):
            raise RecopsError(f"sweep config: resources.custom_per_worker must be a mapping, got {custom!r}")
        bad = [k for k, v in custom.items() if k in ("CPU", "GPU") or isinstance(v, bool) or not v > 0]
        if bad:
            raise RecopsError(
                f"sweep config: resources.custom_per_worker {bad[0]!r}: give a custom resource name (CPU and GPU "
                "have their own keys) and an amount > 0"
            )
        if config.placement_strategy not in PLACEMENT_STRATEGIES:
            raise RecopsError(
                f"sweep config: resources.placement_strategy {config.placement_strategy!r} not in "
                f"{list(PLACEMENT_STRATEGIES)}"
            )
        return config

    @property
    def per_worker(self) -> dict[str, float]:
        """One worker's Ray resources."""
        return {
            "CPU": self.cpus_per_worker,
            **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}),
            **self.custom_per_worker,
        }

    @property
    def cpus(self) -> float:
        return self.workers_per_trial * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers_per_trial * self.gpus_per_worker


@dataclass(frozen=True)
class SweepConfig:
    """A whole sweep: data, fixed settings, search space, schedule, resources and where results go."""

    dataset: DatasetRef
    search: dict[str, Distribution]
    name: str = "sweep"
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    epochs: int = TrainConfig.epochs
    num_samples: int = 4
    metric: str = "auc"
    mode: str = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster fits
    max_failures: int = 1
    storage_path: Path = field(default_factory=lambda: settings().sweeps)
    time_limit_s: float = 0.0
    seed: int = 0
    warm_start: int | str | None = None  # registry version or alias the trials start from

    @classmethod
    def from_dict(cls, data: Any, local: bool = True) -> SweepConfig:
        """Parse and check; ``local`` adds the checks that only hold on this machine (CPU count)."""
        try:
            return cls._parse(data, local)
        except TypeError as exc:
            raise RecopsError(f"sweep config: a value has the wrong type ({exc})") from exc

    @classmethod
    def _parse(cls, data: Any, local: bool) -> SweepConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = dict(_check_keys("top level", data, names, required=("dataset", "search")))
        epochs = data.get("epochs", TrainConfig.epochs)
        if not isinstance(epochs, int) or epochs < 1:
            raise RecopsError(f"sweep config: epochs must be an integer >= 1, got {epochs!r}")
        metric = data.get("metric", "auc")
        if metric not in METRICS:
            raise RecopsError(f"sweep config: metric {metric!r} not in {list(METRICS)}")
        search = _check_keys("search", data["search"], set(model_fields()) | set(_train_fields()))
        parsed = ("dataset", "search", "mode", "scheduler", "resources", "storage_path")
        config = cls(
            **{k: v for k, v in data.items() if k not in parsed},
            dataset=parse_dataset(data["dataset"]),
            search={k: Distribution.parse(k, v) for k, v in search.items()},
            mode=data.get("mode", METRICS[metric]),
            scheduler=SchedulerConfig.parse(data.get("scheduler", "asha"), epochs),
            resources=TrialResources.parse(data.get("resources", {})),
            storage_path=parse_storage_path(data.get("storage_path") or settings().sweeps),
        )
        config.check(local)
        return config

    def check(self, local: bool) -> None:
        _check_keys("model", self.model, set(model_fields()))
        _check_keys("train", self.train, set(_train_fields()))
        both = sorted((set(self.model) | set(self.train)) & set(self.search))
        if both:
            raise RecopsError(f"sweep config: {both} both fixed (model:/train:) and searched (search:); keep one")
        if self.mode not in ("max", "min"):
            raise RecopsError(f"sweep config: mode must be max or min, got {self.mode!r}")
        for key, low in (("num_samples", 1), ("max_concurrent_trials", 0), ("max_failures", 0), ("seed", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise RecopsError(f"sweep config: {key} must be an integer >= {low}, got {value!r}")
        if self.time_limit_s < 0:
            raise RecopsError(f"sweep config: time_limit_s must be >= 0 (0 = none), got {self.time_limit_s}")
        if self.warm_start is not None and not (
            isinstance(self.warm_start, int)
            and self.warm_start >= 1
            or isinstance(self.warm_start, str)
            and self.warm_start
        ):
            raise RecopsError(
                f"sweep config: warm_start must be a registered model version (>= 1) or alias, got {self.warm_start!r}"
            )
        self._check_values()
        cpus = os.cpu_count() or 1
        if local and self.resources.cpus > cpus:
            raise RecopsError(
                f"sweep config: a trial needs {self.resources.cpus:g} CPUs (workers_per_trial "
                f"{self.resources.workers_per_trial} x cpus_per_worker {self.resources.cpus_per_worker:g}) but this "
                f"machine has {cpus}; lower them or pass --address of a cluster"
            )

    def _check_values(self) -> None:
        """Build the configs of the fixed settings and of every bounding value of every dimension, so a bad value
        fails now."""
        checks = [("model:/train:", {})]
        checks += [
            (f"search.{name} value {value!r}", {name: value})
            for name, dist in self.search.items()
            for value in dist.candidates()
        ]
        for where, params in checks:
            try:
                model, train = self.configs(params)
            except RecopsError as exc:
                raise RecopsError(f"sweep config: {where}: {exc}") from exc
            except (TypeError, ValueError) as exc:
                raise RecopsError(f"sweep config: {where} has the wrong type ({exc})") from exc
            self._check_trial(where, model, train)

    def _check_trial(self, where: str, model: Any, train: Any) -> None:
        ints = [
            ("embedding_dim", model.embedding_dim),
            ("batch_size", train.batch_size),
            ("dcn_layers", model.dcn_layers),
            ("dcn_low_rank", model.dcn_low_rank),
            ("patience", train.patience),
            ("max_train_rows", train.max_train_rows),
        ]
        ints += [("dense_arch", v) for v in model.dense_arch] + [("over_arch", v) for v in model.over_arch]
        bad = [k for k, v in ints if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise RecopsError(f"sweep config: {where}: {bad[0]} must be integer(s); use randint, choice or grid for it")
        floats = [train.embedding_lr, train.dense_lr]
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in floats
        ):
            raise RecopsError(f"sweep config: {where}: learning rates must be positive numbers")
        if train.batch_size % self.resources.workers_per_trial:
            raise RecopsError(
                f"sweep config: {where}: batch_size {train.batch_size} is not divisible by "
                f"workers_per_trial {self.resources.workers_per_trial}"
            )
        if not self.resources.gpus_per_worker and train.sharding_type not in CPU_SHARDING_TYPES:
            raise RecopsError(
                f"sweep config: {where}: sharding_type {train.sharding_type} needs GPUs; "
                f"on CPU use one of {CPU_SHARDING_TYPES}"
            )

    def configs(self, params: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
        """The ModelConfig and TrainConfig of one trial: fixed settings overlaid with the trial's sampled ``params``."""
        merged = {**self.model, **self.train, **params}
        model_keys = set(model_fields())
        model = ModelConfig.from_dict({k: v for k, v in merged.items() if k in model_keys})
        train = TrainConfig(
            **{k: v for k, v in merged.items() if k not in model_keys},
            epochs=self.epochs,
            device="cuda" if self.resources.gpus_per_worker else "cpu",
            threads=max(1, int(self.resources.cpus_per_worker)),
        )
        return model, train

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, loadable again with ``from_dict``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            dataset=self.dataset.to_dict(),
            search={k: v.to_dict() for k, v in self.search.items()},
            scheduler=dataclasses.asdict(self.scheduler),
            resources=dataclasses.asdict(self.resources),
            storage_path=str(self.storage_path),
        )
        return json.loads(json.dumps(data))


def load_sweep_config(path: str | Path, local: bool = True) -> SweepConfig:
    """Read and check a sweep YAML file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise RecopsError(f"sweep config {path}: cannot read it ({exc.strerror}); pass an existing YAML file") from exc
    except yaml.YAMLError as exc:
        raise RecopsError(f"sweep config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    try:
        return SweepConfig.from_dict(data, local=local)
    except RecopsError as exc:
        raise RecopsError(f"{path}: {exc}") from exc
