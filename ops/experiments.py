"""Sweep results into the model registry: the best trial's best checkpoint, with lineage, aliased ``candidate``."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from recops.ops.registry import CodeVersion, Lineage, ModelRegistry, ModelVersion
from recops.errors import RecopsError
from recops.training.sweep import SweepResult

REGISTRATION_FILE = "registration.json"  # in the experiment dir: the version this sweep registered (no duplicates on resume)


def warm_start_checkpoint(registry: ModelRegistry, version: int | None) -> Path | None:
    """The checkpoint directory of the registered model a sweep warm-starts from."""
    return None if version is None else registry.get(version).checkpoint


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def register_best(result: SweepResult, registry: ModelRegistry, alias: str = "candidate") -> ModelVersion:
    """Register ``result``'s best checkpoint (once per experiment) and point ``alias`` at it."""
    best = result.best
    if best is None:
        raise RecopsError(f"sweep {result.sweep_id}: no trial produced a checkpoint ({result.num_errors} errors); "
                          f"see {result.experiment_dir}/trials/*/trial_record.json")
    marker = result.experiment_dir / REGISTRATION_FILE
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["trial_id"] == best.trial_id and done["checkpoint"] == best.best_checkpoint:
            version = registry.get(done["version"])
            registry.set_alias(version.version, alias, reason=f"best of sweep {result.sweep_id}")
            return registry.get(version.version)
    env = best.environment or result.environment.to_dict()
    code = result.environment.code  # the driver's tree: the code that defined the sweep
    lineage = Lineage(sweep_id=result.sweep_id, trial_id=best.trial_id, parent_version=result.config.warm_start,
                      code=CodeVersion(git_sha=code.git_sha, dirty=code.dirty),
                      libraries=env.get("libraries", {}), hardware=env.get("hardware", {}))
    params = {**result.best_params, "sweep": {"metric": result.config.metric, "epochs": result.config.epochs,
                                              "experiment_dir": str(result.experiment_dir)}}
    version = registry.register(result.best_checkpoint, _numbers(result.best_metrics), params,
                                result.config.dataset.version, lineage)
    fd, tmp = tempfile.mkstemp(dir=result.experiment_dir, prefix=f".{REGISTRATION_FILE}.")
    with os.fdopen(fd, "w") as fh:
        json.dump({"version": version.version, "trial_id": best.trial_id, "checkpoint": best.best_checkpoint,
                   "registry": str(getattr(registry, "root", ""))}, fh)
    os.replace(tmp, marker)
    registry.set_alias(version.version, alias, reason=f"best of sweep {result.sweep_id}")
    return registry.get(version.version)
