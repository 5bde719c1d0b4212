"""Default locations, one object, one environment variable each.

=================  ==========================  ================  ==========================================
setting            environment variable        default           what lives there
=================  ==========================  ================  ==========================================
datasets           ``RECOPS_DATASETS``         runs/datasets     versioned processed datasets (``data ingest``)
runs               ``RECOPS_RUNS``             runs              training runs, demo, loop state
sweeps             ``RECOPS_SWEEPS``           runs/sweeps       Ray Tune experiment directories
registry           ``RECOPS_REGISTRY``         runs/registry     the model registry
model_repository   ``RECOPS_MODEL_REPOSITORY`` triton_models     the Triton model repository
bench_results      ``RECOPS_BENCH_RESULTS``    runs/bench        benchmark JSON, plots and report
=================  ==========================  ================  ==========================================

Relative paths are relative to the current working directory (the repository root for ``make demo``).
The values are read from the environment on every call of :func:`settings`, so a changed variable applies
to the next command without a restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

ENVIRONMENT = {  # setting -> (environment variable, default)
    "datasets": ("RECOPS_DATASETS", "runs/datasets"),
    "runs": ("RECOPS_RUNS", "runs"),
    "sweeps": ("RECOPS_SWEEPS", "runs/sweeps"),
    "registry": ("RECOPS_REGISTRY", "runs/registry"),
    "model_repository": ("RECOPS_MODEL_REPOSITORY", "triton_models"),
    "bench_results": ("RECOPS_BENCH_RESULTS", "runs/bench"),
}


@dataclass(frozen=True)
class Settings:
    """Where recops reads and writes when a command is not told otherwise."""

    datasets: Path
    runs: Path
    sweeps: Path
    registry: Path
    model_repository: Path
    bench_results: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        return cls(**{f.name: Path(environ.get(ENVIRONMENT[f.name][0]) or ENVIRONMENT[f.name][1]) for f in fields(cls)})


def settings() -> Settings:
    """The settings of this process's environment, read now."""
    return Settings.from_env()
