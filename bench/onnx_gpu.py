"""Inference on a GPU: the exported DLRM in ONNX Runtime (CUDA EP, CPU EP) vs torch eager on the device.

The module is ``recops.serving.inference_module.InferenceDLRM`` (what ``recops export`` writes) with random
weights on Criteo-shaped tables, exported with the serving exporter. Each call scores one batch of
host (numpy) inputs and returns host probabilities, so every backend pays its own transfers.
Latency percentiles and samples/s per batch size; ratios against ``torch_eager`` on the same device.
A backend that cannot run here (e.g. no ``CUDAExecutionProvider`` without onnxruntime-gpu) is
recorded under ``skipped`` with the reason.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recops.bench.common import bench_parser, format_table, pin_threads, run_main, write_result
from recops.bench.train_throughput import ThroughputConfig, _ints
from recops.errors import RecopsError

NAME = "onnx_gpu"
BASELINE = "torch_eager"


def build_module(max_rows: int, dim: int, seed: int = 0):
    """A random-weight ``InferenceDLRM`` over the Criteo tables (capped at ``max_rows``) and its layout."""
    import torch

    from recops.serving.inference_module import InferenceDLRM
    from recops.serving.onnx_model import FeatureLayout
    from recops.training.model import DLRM

    config = ThroughputConfig(max_rows=max_rows, embedding_dim=dim).model_config()
    torch.manual_seed(seed)
    state = DLRM(config).state_dict()
    layout = FeatureLayout(config.num_dense, dict(config.tables), tuple(config.tables), {})
    return InferenceDLRM(config, layout, state), layout


def _torch_backend(module, layout, device: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    module = module.to(device)
    names = [s.name for s in layout.input_specs()]

    @torch.no_grad()
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return module(*(torch.from_numpy(inputs[n]).to(device) for n in names)).cpu().numpy()

    return run


def _ort_backend(path: Path, provider: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise RecopsError(
            f"onnxruntime {ort.__version__} has no {provider} (available: {available}); "
            "the CUDA EP needs the onnxruntime-gpu wheel"
        )
    session = ort.InferenceSession(str(path), providers=[provider])
    if session.get_providers()[0] != provider:
        raise RecopsError(f"onnxruntime fell back to {session.get_providers()} instead of {provider}")
    return lambda inputs: session.run(None, inputs)[0]


def latency_row(run: Callable, inputs: dict[str, np.ndarray], min_seconds: float, warmup: int = 3) -> dict[str, float]:
    """Per-call latency percentiles (ms) and samples/s over at least ``min_seconds`` of calls."""
    for _ in range(warmup):
        run(inputs)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 5:
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    batch = len(inputs["dense"])
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "calls": len(times),
        "samples_per_s": batch * len(times) / sum(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--device", default="cuda", help="device for torch eager (cuda or cpu)")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 64, 1024, 16384))
    p.add_argument("--max-rows", type=int, default=1_000_000, help="cap on each Criteo table")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--min-seconds", type=float, default=2.0, help="timed calls per point")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_rows, args.embedding_dim, args.min_seconds = (1, 64), 1000, 8, 0.2
    import torch

    pin_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecopsError("onnx_gpu: --device cuda but torch sees no GPU; use --device cpu")
    from recops.serving.export import _onnx_export

    module, layout = build_module(args.max_rows, args.embedding_dim)
    specs = layout.input_specs()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="recops-onnx-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        example = layout.random_inputs(4, rng)
        exporter = _onnx_export(
            module,
            tuple(torch.from_numpy(example[s.name]) for s in specs),
            [s.name for s in specs],
            path,
            external=True,
        )
        backends: dict[str, Callable] = {BASELINE: _torch_backend(module, layout, args.device)}
        skipped: dict[str, str] = {}
        for name, provider in (("ort_cuda", "CUDAExecutionProvider"), ("ort_cpu", "CPUExecutionProvider")):
            try:
                backends[name] = _ort_backend(path, provider)
            except RecopsError as exc:
                skipped[name] = str(exc)
        rows: list[dict[str, Any]] = []
        for bs in args.batch_sizes:
            inputs = layout.random_inputs(bs, rng)
            for name, run in backends.items():
                rows.append({"backend": name, "batch_size": bs, **latency_row(run, inputs, args.min_seconds)})
    base = {r["batch_size"]: r["samples_per_s"] for r in rows if r["backend"] == BASELINE}
    for r in rows:
        r[f"throughput_vs_{BASELINE}"] = r["samples_per_s"] / base[r["batch_size"]]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    plots = [
        {
            "x": "batch_size",
            "y": ["p50_ms", "p99_ms"],
            "series": "backend",
            "log_x": True,
            "log_y": True,
            "title": "DLRM inference latency per call (ms)",
        },
        {
            "x": "batch_size",
            "y": "samples_per_s",
            "series": "backend",
            "log_x": True,
            "log_y": True,
            "title": "DLRM inference throughput (samples/s)",
        },
    ]
    out = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline=BASELINE,
        plots=plots,
        skipped=skipped,
        exporter=exporter,
        config={
            "max_rows": args.max_rows,
            "embedding_dim": args.embedding_dim,
            "device": args.device,
            "device_name": device_name,
            "batch_sizes": list(args.batch_sizes),
        },
        variants={
            BASELINE: f"InferenceDLRM eager on {device_name}",
            "ort_cuda": "ONNX Runtime CUDAExecutionProvider",
            "ort_cpu": "ONNX Runtime CPUExecutionProvider",
        },
    )
    print(
        format_table(rows, ["backend", "batch_size", "p50_ms", "p99_ms", "samples_per_s", f"throughput_vs_{BASELINE}"])
    )
    for name, why in skipped.items():
        print(f"{name}: skipped: {why}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main, "onnx_gpu")
