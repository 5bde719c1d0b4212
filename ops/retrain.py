"""Training runs and sweeps into the registry, and the loop's retrain stage.

``register_run`` and ``register_best`` put a finished ``recops train`` run or a sweep's best trial into the registry
with its lineage (dataset root + version, code, libraries, hardware, metrics named by split); ``sweep_and_register``
is the one way a sweep becomes a registered candidate (``recops sweep``, the demo and the loop). ``Retrainer`` is
the loop's retrain stage: the incident's windows become a new dataset version (the production dataset's
preprocessing), trained warm-started from production when the tables and preprocessing allow. A retraining a killed
loop left behind is continued, not started again: a run resumes from its checkpoint, a sweep with ``--resume``.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.ops.loop_config import RetrainConfig
from recops.ops.loop_state import ModelRef, Trained
from recops.ops.publish import environment_lineage, register_checkpoint
from recops.ops.registry import ModelRegistry, ModelVersion
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import Dataset, ingest
from recops.training.sweep import SweepResult, resume_sweep, run_sweep
from recops.training.sweep_config import SweepConfig
from recops.training.train import TrainResult, fit

REGISTRATION_FILE = "registration.json"  # in a sweep's experiment dir: the version it registered (none twice)
RETRAIN_SWEEP: dict[str, Any] = {  # the retraining sweep when no template is given
    "train": {"batch_size": 512},
    "search": {"embedding_lr": {"choice": [0.02, 0.05]}},
    "epochs": 2,
    "num_samples": 2,
    "metric": "auc",
    "scheduler": {"type": "fifo"},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "max_failures": 0,
    "time_limit_s": 600,
}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def run_metrics(result: TrainResult) -> dict[str, float]:
    """A run's figures named by split: the best epoch's ``val_*``, the test split's ``test_*``."""
    return _numbers(
        {
            "val_auc": result.val_auc,
            "val_logloss": result.val_logloss,
            "test_auc": result.test_auc,
            "test_logloss": result.test_logloss,
        }
    )


def register_run(
    registry: ModelRegistry,
    result: TrainResult,
    parent_version: int | None = None,
    alias: str | None = None,
    reason: str = "",
) -> ModelVersion:
    """Register a finished run's best checkpoint (``alias`` it if given)."""
    version = register_checkpoint(
        registry,
        Checkpoint.open(result.checkpoint),
        run_metrics(result),
        lineage=environment_lineage(parent_version=parent_version),
    )
    if alias:
        registry.set_alias(version.version, alias, reason=reason or f"run {Path(result.checkpoint).parents[1]}")
    return registry.get(version.version)


def register_best(
    result: SweepResult, registry: ModelRegistry, alias: str = "candidate", parent_version: int | None = None
) -> ModelVersion:
    """Register ``result``'s best checkpoint (once per experiment) and point ``alias`` at it."""
    best = result.best
    if best is None:
        raise RecopsError(
            f"sweep {result.sweep_id}: no trial produced a checkpoint ({result.num_errors} errors); "
            f"see {result.experiment_dir}/trials/*/trial_record.json"
        )
    reason = f"best of sweep {result.sweep_id}"
    marker = result.experiment_dir / REGISTRATION_FILE
    done = yaml.safe_load(marker.read_text()) if marker.exists() else None
    if done and done["trial_id"] == best.trial_id and done["checkpoint"] == best.best_checkpoint:
        registry.set_alias(done["version"], alias, reason=reason)
        return registry.get(done["version"])
    env = best.environment or result.environment.to_dict()
    lineage = replace(
        environment_lineage(sweep_id=result.sweep_id, trial_id=best.trial_id, parent_version=parent_version),
        code=result.environment.code,  # the driver's tree: the code that defined the sweep
        libraries=env.get("libraries", {}),
        hardware=env.get("hardware", {}),
    )
    params = {
        **result.best_params,
        "sweep": {
            "metric": result.config.metric,
            "epochs": result.config.epochs,
            "experiment_dir": str(result.experiment_dir),
        },
    }
    version = register_checkpoint(
        registry, Checkpoint.open(result.best_checkpoint), _numbers(result.best_metrics), params, lineage
    )
    write_json_atomic(
        marker,
        {
            "version": version.version,
            "trial_id": best.trial_id,
            "checkpoint": best.best_checkpoint,
            "registry": str(getattr(registry, "root", "")),
        },
    )
    registry.set_alias(version.version, alias, reason=reason)
    return registry.get(version.version)


def sweep_and_register(
    config: SweepConfig,
    registry: ModelRegistry,
    address: str | None = None,
    alias: str = "candidate",
    register: bool = True,
) -> tuple[SweepResult, ModelVersion | None]:
    """Run a sweep (warm-started from ``config.warm_start``, a registry version or alias) and register its best
    trial; the version is None when the sweep was interrupted or ``register`` is off."""
    parent = registry.resolve(config.warm_start) if config.warm_start is not None else None
    result = run_sweep(config, address=address, warm_start=parent.checkpoint if parent else None)
    if result.status == "interrupted" or not register:
        return result, None
    return result, register_best(result, registry, alias, parent.version if parent else None)


def incident_windows(
    index: int, fired: list[str], streaks: dict[str, int], since_window: int, config: RetrainConfig
) -> list[int]:
    """The fired streak's windows, else those since production took over, clamped to the retrain bounds."""
    span = max((streaks[k] for k in fired if k in streaks), default=index + 1 - since_window)
    span = min(max(span, config.min_windows), config.max_windows, index + 1)
    return list(range(index + 1 - span, index + 1))


class Retrainer:
    """Turns an incident's labelled windows into a registered candidate."""

    def __init__(self, config: RetrainConfig, registry: ModelRegistry, datasets: Path):
        self.config, self.registry, self.datasets = config, registry, Path(datasets)

    def retrain(self, files: list[Path], production: ModelRef, run_dir: Path, reason: str) -> Trained:
        base = Dataset.open(production.dataset)
        dataset = ingest(files, self.datasets, spec=base.spec, config=base.preprocess_config)
        run_dir.mkdir(parents=True, exist_ok=True)
        parent = Checkpoint.open(production.checkpoint)
        problem = self._warm_start_problem(parent, dataset, production)
        started = time.time()
        if self.config.use_sweep:
            version, method, sweep_id = self._sweep(dataset, run_dir, parent, production, problem)
        else:
            version, method, sweep_id = self._fit(dataset, run_dir, parent, production, problem, reason), "train", None
        warm = f"warm start from v{production.repo_version}" if problem is None else f"from scratch ({problem})"
        return Trained(
            method=method,
            registry_version=version.version,
            checkpoint=str(version.checkpoint),
            dataset=str(dataset.path),
            dataset_version=dataset.version,
            rows=dataset.rows,
            metrics={
                k: v for k, v in version.metrics.items() if k in ("val_auc", "val_logloss", "test_auc", "test_logloss")
            },
            warm_start=warm,
            train_s=round(time.time() - started, 1),
            sweep_id=sweep_id,
        )

    def _warm_start_problem(self, parent: Checkpoint, dataset: Dataset, production: ModelRef) -> str | None:
        """Why production cannot seed this retraining (None if it can)."""
        if not self.config.warm_start:
            return "warm start disabled"
        if self.config.use_sweep and production.registry_version is None:
            return "the production model is not in the registry"
        return parent.warm_start_problem(dataset)

    def _fit(
        self,
        dataset: Dataset,
        run_dir: Path,
        parent: Checkpoint,
        production: ModelRef,
        problem: str | None,
        reason: str,
    ) -> ModelVersion:
        """``fit`` on the production architecture, seeded with its weights and optimizer state when compatible."""
        arch = replace(parent.meta.model, tables={})
        result = fit(
            dataset.path,
            arch,
            self.config.train,
            run_dir,
            resume=True,
            warm_start=parent.path if problem is None else None,
        )
        return register_run(
            self.registry,
            result,
            production.registry_version if problem is None else None,
            alias="candidate",
            reason=reason,
        )

    def _sweep(
        self, dataset: Dataset, run_dir: Path, parent: Checkpoint, production: ModelRef, problem: str | None
    ) -> tuple[ModelVersion, str, str]:
        """A small sweep over the production architecture, warm-started when compatible."""
        template = self.config.sweep_config
        base = yaml.safe_load(Path(template).read_text()) if template else RETRAIN_SWEEP
        arch = {k: v for k, v in parent.meta.model.to_dict().items() if k not in ("tables", "num_dense")}
        data = {
            **base,
            "name": f"retrain-{run_dir.name}",
            "dataset": str(dataset.path),
            "model": arch,
            "search": {k: v for k, v in base.get("search", {}).items() if k not in arch},
            "storage_path": str(run_dir / "sweeps"),
            "warm_start": production.registry_version if problem is None else None,
        }
        resumed = self._resume(run_dir / "sweeps", data["warm_start"])
        result, version = resumed or sweep_and_register(SweepConfig.from_dict(data), self.registry)
        if version is None or result.best is None:
            raise RecopsError(
                f"retraining sweep {result.experiment_dir} ended {result.status} with "
                f"{result.num_errors} failed trials and no usable checkpoint"
            )
        return version, f"sweep of {len(result.trials)} trials", result.sweep_id

    def _resume(self, storage: Path, parent: int | None) -> tuple[SweepResult, ModelVersion | None] | None:
        """The retraining sweep a killed loop left in this run dir, resumed instead of started again (None: there is
        none); an experiment killed before Tune saved anything is removed."""
        from ray.tune import Tuner

        for saved in sorted(storage.glob("*/sweep_config.json"), reverse=True):
            if not Tuner.can_restore(str(saved.parent / "tune")):  # killed before Tune saved anything
                shutil.rmtree(saved.parent)
                continue
            result = resume_sweep(saved.parent)
            if result.status == "interrupted":
                return result, None
            return result, register_best(result, self.registry, "candidate", parent)
        return None
