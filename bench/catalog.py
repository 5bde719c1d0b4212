"""The benchmarks `recops bench` runs, and the sizes that fit this 2-core, 24 GiB machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recops.bench.common import BENCH_DIR


@dataclass(frozen=True)
class Benchmark:
    """A script ``bench/<name>.py`` (``main(argv)``, writes ``<results-dir>/<name>.json``) and the extra
    arguments that size it for this 2-core, 24 GiB machine."""

    name: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    timeout_s: float = 1800
    gpu_only: bool = False  # skipped (and reported so) where no GPU is visible

    @property
    def script(self) -> Path:
        return BENCH_DIR / f"{self.name}.py"


BENCHMARKS = (
    Benchmark("train_throughput", full=("--preset", "reference", "--nproc", "1,2"), timeout_s=1800),
    Benchmark("serve_latency"),
    Benchmark("sweep_overhead"),
    Benchmark("multinode_sweep"),
    Benchmark("drift_speed", full=("--rows", "200000")),
    Benchmark("ingest_speed"),
    Benchmark("quality_real", quick=("--models", "recops_dcn,lightgbm"), timeout_s=2400),
    Benchmark("onnx_gpu", gpu_only=True),
    Benchmark("faults", quick=("--scenarios", "ingest,deploy"), timeout_s=3600),
)
