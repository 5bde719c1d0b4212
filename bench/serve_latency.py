"""Serving latency and throughput: TorchRec eager vs in-process ONNX Runtime vs Triton (HTTP, gRPC), on model
tensors and on raw rows (the raw-feature model: Triton's ensemble preprocessing in the server).

One DLRM (Criteo shape: 13 dense, 26 tables of ``--table-size`` rows, dim 16, random weights) is saved as
a checkpoint, exported with ``recops.serving.export`` (parity-gated) into a temporary model repository, deployed
(the tensor-level model and its raw-feature model ``<model>_raw``) and served by a local Triton server (cpu target:
python backend running the same ONNX with onnxruntime). For each batch size and client concurrency every backend
answers back-to-back requests for ``--seconds``:

- ``torch_eager``: ``recops.training.model.DLRM`` (EmbeddingBagCollection fed a KeyedJaggedTensor built per request)
- ``onnxruntime``: ``InferenceSession.run`` on model tensors in this process (the baseline Triton is compared with)
- ``triton_http`` / ``triton_grpc``: model tensors to the tensor-level model through ``recops.serving.client``
- ``preprocess_onnxruntime``: raw rows (a DataFrame) through ``Preprocessor.transform`` and ONNX Runtime here
- ``triton_raw_http`` / ``triton_raw_grpc``: the same raw rows as request tensors to the raw-feature model

Latency is per request, throughput is rows/s over a round's wall time; each cell runs in rounds that
interleave the backends (a busy host slows them alike) and reports the median p50 and rows/s over rounds
and the p99 over all requests. Raw-row cells also carry ratios against the tensor-level model over the same
protocol and against in-process preprocessing + ONNX Runtime; ``raw_breakdown`` splits a raw request's server
time into the ensemble's steps (Triton's own statistics). ``perf_analyzer`` (the
C++ load generator in the tritonclient wheel) is run too when it can start: it needs ``libcudart.so.12``
(``--cudart-dir``, or the ``nvidia-cuda-runtime-cu12`` wheel installed) even on CPU hosts.
Writes ``serve_latency.json`` and ``serve_latency.png`` to ``--results-dir``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recops.bench.common import bench_parser, cores, format_table, hardware, pin_threads, write_result
from recops.errors import RecopsError

NAME = "serve_latency"
MODEL = "dlrm_bench"
RAW_MODEL = f"{MODEL}_raw"
BACKENDS = (
    "torch_eager",
    "onnxruntime",
    "triton_http",
    "triton_grpc",
    "preprocess_onnxruntime",
    "triton_raw_http",
    "triton_raw_grpc",
)
BASELINE = "onnxruntime"  # ratios are against this backend at the same batch size and concurrency
RAW_BASELINE = "preprocess_onnxruntime"  # raw rows in process
TENSOR_TWIN = {"triton_raw_http": "triton_http", "triton_raw_grpc": "triton_grpc"}  # raw-row backend -> tensor one
PA_COMPONENTS = (
    "Client Send",
    "Network+Server Send/Recv",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
)  # they add up to the mean latency


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 64, 512, 1024, 4096)
    concurrency: tuple[int, ...] = (1, 4)
    table_size: int = 100_000
    seconds: float = 0.5  # per round of a (backend, batch, concurrency) cell, after warm-up
    rounds: int = 3  # rounds interleave the backends, so a busy host slows them alike; medians are reported
    min_requests: int = 3
    warmup: int = 2
    # intra-op threads of every backend (torch, onnxruntime here and in Triton). 1 by default: on a shared
    # 2-core host onnxruntime's spinning 2-thread pool measured 2x slower at p50 than one thread.
    threads: int = 1
    instances: int = 0  # Triton model instances; 0 = one per usable core, as in-process ONNX Runtime gets them all
    perf_analyzer: bool = True
    cudart_dir: str | None = None


def random_checkpoint(out: Path, table_size: int, seed: int = 0) -> Path:
    """A checkpoint of an untrained Criteo-shaped DLRM (latency does not depend on the weights)."""
    import torch

    from recops.training import checkpoint
    from recops.training.config import ModelConfig, TrainConfig
    from recops.training.dataset import DatasetRef
    from recops.training.model import DLRM
    from recops.training.preprocess import Preprocessor
    from recops.training.spec import ColumnSpec, PreprocessConfig

    preprocessor = Preprocessor(ColumnSpec.criteo(), PreprocessConfig(table_size=table_size))
    config = ModelConfig(tables=preprocessor.table_sizes, num_dense=13)
    torch.manual_seed(seed)
    model = DLRM(config)
    meta = checkpoint.CheckpointMeta(
        model=config, train=TrainConfig(), dataset=DatasetRef(out, "random"), preprocessor=preprocessor.to_dict()
    )
    checkpoint.save(out, {k: v.detach() for k, v in model.state_dict().items()}, {"dense": {}, "fused": {}}, meta)
    return out


# ---- one measured cell ----------------------------------------------------------------------------
@dataclass
class Cell:
    """The requests' latencies (s) and wall seconds of each round of one (backend, batch, concurrency)."""

    latencies: list[np.ndarray]
    walls: list[float]

    def summary(self, rows: int) -> dict[str, float]:
        """p50: median of the rounds' p50s; p99 over all requests; rows/s: median of the rounds'."""
        flat = np.concatenate(self.latencies) * 1e3
        return {
            "requests": int(flat.size),
            "p50_ms": float(np.median([np.percentile(lat * 1e3, 50) for lat in self.latencies])),
            "p99_ms": float(np.percentile(flat, 99)),
            "mean_ms": float(flat.mean()),
            "rows_per_s": float(np.median([lat.size * rows / wall for lat, wall in zip(self.latencies, self.walls)])),
        }


def run_round(
    make_call: Callable[[], Callable[[], Any]], concurrency: int, cfg: LatencyConfig
) -> tuple[np.ndarray, float]:
    """``concurrency`` threads, each with its own ``make_call()`` (made and warmed up in that thread: HTTP
    clients are bound to it), send requests back-to-back for ``cfg.seconds``: (latencies, wall seconds)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    clock: dict[str, float] = {}

    def start_clock() -> None:  # runs once all threads are warm, before any is released
        clock["begin"] = time.perf_counter()
        clock["stop"] = clock["begin"] + cfg.seconds

    ready = threading.Barrier(concurrency + 1, action=start_clock)

    def worker(i: int) -> None:
        try:
            call = make_call()
            for _ in range(cfg.warmup):
                call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        try:
            while True:
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                latencies[i].append(t1 - t0)
                if t1 >= clock["stop"] and len(latencies[i]) >= cfg.min_requests:
                    return
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    wall = time.perf_counter() - clock.get("begin", 0.0)
    if errors:
        raise RecopsError(f"a request failed during the measurement: {errors[0]}") from errors[0]
    return np.array([x for per in latencies for x in per]), wall


@dataclass(frozen=True)
class RawRows:
    """Raw rows of one batch: as a DataFrame (in process) and as the raw-feature model's request tensors."""

    frame: Any
    tensors: dict[str, np.ndarray]


class Backends:
    """Callables that score one batch on each backend (a fresh client per calling thread for Triton)."""

    def __init__(self, ckpt_dir: Path, version_dir: Path, server, threads: int):
        from recops.serving.inference_module import load_torchrec
        from recops.serving.onnx_model import ExportRecord, onnx_session, read_preprocessor
        from recops.training.checkpoint import Checkpoint

        self.torch_model = load_torchrec(Checkpoint.open(ckpt_dir))
        self.session = onnx_session(version_dir / "model.onnx", threads=threads, device="cpu")
        self.preprocessor, self.layout = read_preprocessor(version_dir), ExportRecord.read(version_dir).layout
        self.server = server
        self.clients: list = []

    def factory(self, backend: str, inputs: dict[str, np.ndarray], raw: RawRows) -> Callable[[], Callable[[], Any]]:
        if backend == "torch_eager":
            return lambda: self._torch_call(inputs)
        if backend == "onnxruntime":
            return lambda: (lambda: self.session.run(None, inputs))
        if backend == RAW_BASELINE:
            return lambda: (lambda: self.session.run(None, self._features(raw.frame)))
        if backend in TENSOR_TWIN:
            return lambda: self._triton_call(backend.rsplit("_", 1)[1], raw.tensors, RAW_MODEL)
        return lambda: self._triton_call(backend.split("_")[1], inputs, MODEL)

    def _features(self, frame) -> dict[str, np.ndarray]:
        features = self.preprocessor.transform(frame)
        return self.layout.features_inputs(features.dense, features.sparse, features.multi)

    def _torch_call(self, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
        import torch

        from recops.training.model import to_kjt

        model = self.torch_model

        def call():
            with torch.inference_mode():
                kjt = to_kjt(model.keys, inputs["sparse"])
                return torch.sigmoid(model(torch.from_numpy(inputs["dense"]), kjt))

        return call

    def _triton_call(self, protocol: str, inputs: dict[str, np.ndarray], model: str) -> Callable[[], Any]:
        from recops.serving.client import Predictor

        url = self.server.http_url if protocol == "http" else self.server.grpc_url
        rows = max(len(next(iter(inputs.values()))), 1)
        client = Predictor(url, model, protocol=protocol, batch_size=rows, timeout_s=60)
        self.clients.append(client)
        return lambda: client.predict(inputs)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


def raw_rows(preprocessor, batch: int, columns) -> RawRows:
    from recops.serving.raw_features import random_raw_frame, raw_inputs

    frame = random_raw_frame(preprocessor.spec, batch, np.random.default_rng(batch))
    return RawRows(frame, raw_inputs(frame, columns, preprocessor.spec.separator))


# ---- where a raw request's time goes --------------------------------------------------------------------------------
STEPS = {  # label -> Triton model
    "ensemble": RAW_MODEL,
    "preprocess_step": f"{RAW_MODEL}_preprocess",
    "score_step": f"{RAW_MODEL}_score",
    "tensor_model": MODEL,
}


def _success(client, model: str) -> tuple[int, int]:
    """(requests, total ns) Triton counted as successful for every version of ``model``."""
    stats = client.get_inference_statistics(model)["model_stats"]
    return (
        sum(int(s["inference_stats"]["success"]["count"]) for s in stats),
        sum(int(s["inference_stats"]["success"]["ns"]) for s in stats),
    )


def raw_breakdown(server, raws: dict[int, RawRows], seconds: float) -> list[dict[str, Any]]:
    """Per batch size: sequential raw requests over HTTP for ``seconds``; the client's mean latency and, from Triton's
    statistics, the mean server time of the ensemble, each step (the score step includes the tensor-level model it
    calls) and the tensor-level model, per request (ms)."""
    import tritonclient.http as httpclient

    from recops.serving.client import Predictor
    from recops.serving.server import http_address

    stats = httpclient.InferenceServerClient(http_address(server.http_url))
    out = []
    try:
        for batch, raw in raws.items():
            with Predictor(server.http_url, RAW_MODEL, batch_size=batch, timeout_s=60) as client:
                client.predict(raw.tensors)
                before = {label: _success(stats, model) for label, model in STEPS.items()}
                latencies, stop = [], time.perf_counter() + seconds
                while time.perf_counter() < stop or len(latencies) < 3:
                    t0 = time.perf_counter()
                    client.predict(raw.tensors)
                    latencies.append(time.perf_counter() - t0)
            after = {label: _success(stats, model) for label, model in STEPS.items()}
            row: dict[str, Any] = {"batch_size": batch, "requests": len(latencies)}
            row["client_ms"] = float(np.mean(latencies) * 1e3)
            for label in STEPS:
                count, ns = (a - b for a, b in zip(after[label], before[label]))
                row[f"{label}_ms"] = ns / count / 1e6 if count else None
            out.append(row)
    finally:
        stats.close()
    return out


# ---- perf_analyzer ---------------------------------------------------------------------------------
def perf_analyzer_env(cudart_dir: str | None) -> tuple[dict[str, str] | None, str]:
    """(environment that lets the wheel's perf_analyzer start, or None) and why not."""
    binary = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if binary is None:
        return None, "no perf_analyzer next to this interpreter (the tritonclient wheel ships it in bin/)"
    spec = importlib.util.find_spec("pytriton")
    libs = Path(spec.origin).parents[1] / "nvidia_pytriton.libs" if spec and spec.origin else None
    b64 = sorted(libs.glob("libb64*.so.0d")) if libs and libs.is_dir() else []
    candidates = [Path(cudart_dir)] if cudart_dir else []
    runtime = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if runtime and runtime.submodule_search_locations:
        candidates.append(Path(list(runtime.submodule_search_locations)[0]) / "lib")
    cudart = next((c / "libcudart.so.12" for c in candidates if (c / "libcudart.so.12").is_file()), None)
    if not b64:
        return None, "perf_analyzer needs libb64.so.0d; nvidia-pytriton's bundled copy was not found"
    if cudart is None:
        return None, (
            "perf_analyzer is linked against libcudart.so.12 even for CPU runs; pass --cudart-dir "
            "(e.g. from the nvidia-cuda-runtime-cu12 wheel) to run it"
        )
    shim = Path(tempfile.mkdtemp(prefix="recops-pa-libs-"))
    (shim / "libb64.so.0d").symlink_to(b64[0])
    (shim / "libcudart.so.12").symlink_to(cudart)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{shim}:{os.environ.get('LD_LIBRARY_PATH', '')}", "PA_BINARY": binary}
    return env, ""


def perf_analyzer_cell(
    env: dict[str, str], server, protocol: str, batch: int, concurrency: int, data_file: Path, seconds: float
) -> dict[str, Any]:
    url = server.http_url if protocol == "http" else server.grpc_url
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [
            env["PA_BINARY"],
            "-m",
            MODEL,
            "-x",
            "1",
            "-u",
            url.split("://")[1],
            "-i",
            protocol,
            "-b",
            str(batch),
            f"--concurrency-range={concurrency}:{concurrency}",
            f"--input-data={data_file}",
            # a shared host rarely gives 3 windows within 10%: report what was measured instead of failing
            f"--measurement-interval={int(seconds * 1000)}",
            "--max-trials=6",
            "--stability-percentage=1000",
            "-f",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.is_file():
            raise RecopsError(f"perf_analyzer exit {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
        row = next(csv.DictReader(out.open()))
    return {
        "backend": f"perf_analyzer_{protocol}",
        "batch_size": batch,
        "concurrency": concurrency,
        "p50_ms": float(row["p50 latency"]) / 1e3,
        "p99_ms": float(row["p99 latency"]) / 1e3,
        "mean_ms": sum(float(row[c]) for c in PA_COMPONENTS) / 1e3,
        "rows_per_s": float(row["Inferences/Second"]),
        "server_queue_ms": float(row["Server Queue"]) / 1e3,
        "server_compute_ms": (
            float(row["Server Compute Input"])
            + float(row["Server Compute Infer"])
            + float(row["Server Compute Output"])
        )
        / 1e3,
    }


def perf_analyzer_data(layout, path: Path, rows: int = 64) -> Path:
    inputs = layout.random_inputs(rows, np.random.default_rng(7))
    path.write_text(
        json.dumps({"data": [{name: value[i].tolist() for name, value in inputs.items()} for i in range(rows)]})
    )
    return path


# ---- aims, plot --------------------------------------------------------------------------------------
def _cell(rows: list[dict], backend: str, batch: int, concurrency: int) -> dict | None:
    return next(
        (r for r in rows if (r["backend"], r["batch_size"], r["concurrency"]) == (backend, batch, concurrency)), None
    )


def aims(rows: list[dict]) -> dict[str, Any]:
    """The stated goals, each with the measured figure and whether it was met."""
    out: dict[str, Any] = {}
    torch1, ort1 = _cell(rows, "torch_eager", 1, 1), _cell(rows, "onnxruntime", 1, 1)
    if torch1 and ort1:
        ratio = ort1["p50_ms"] / torch1["p50_ms"]
        out["ort_over_torch_p50_batch1"] = {"value": round(ratio, 3), "aim": "<= 0.5", "met": ratio <= 0.5}
    for protocol in ("http", "grpc"):
        _aim_pair(out, rows, f"triton_{protocol}", "onnxruntime", 0.5)
        _aim_pair(out, rows, f"triton_raw_{protocol}", f"triton_{protocol}", 0.3)
    return out


def _aim_pair(out: dict[str, Any], rows: list[dict], backend: str, base: str, extra_ms: float) -> None:
    """``backend``'s aims against ``base``: at most ``extra_ms`` more p50 at batch 1, at least 0.8 of its rows/s at
    batch 1024 (each concurrency measured)."""
    one, base_one = _cell(rows, backend, 1, 1), _cell(rows, base, 1, 1)
    if one and base_one:
        extra = one["p50_ms"] - base_one["p50_ms"]
        out[f"{backend}_extra_p50_ms_batch1"] = {
            "value": round(extra, 3),
            "over": base,
            "aim": f"<= {extra_ms}",
            "met": extra <= extra_ms,
        }
    for conc in sorted({r["concurrency"] for r in rows}):
        cell, base_cell = _cell(rows, backend, 1024, conc), _cell(rows, base, 1024, conc)
        if cell and base_cell:
            ratio = cell["rows_per_s"] / base_cell["rows_per_s"]
            out[f"{backend}_throughput_share_batch1024_c{conc}"] = {
                "value": round(ratio, 3),
                "over": base,
                "aim": ">= 0.8",
                "met": ratio >= 0.8,
            }


def add_ratios(rows: list[dict]) -> None:
    """Each row's ``variant`` label and its p50 and throughput as ratios against the in-process ONNX Runtime
    cell of the same batch size and concurrency (the same model without a server: the serving overhead); raw-row
    cells also against the tensor-level model over their protocol (``_vs_tensor``, and ``extra_p50_ms_vs_tensor``)
    and against in-process preprocessing + ONNX Runtime (``_vs_preprocess_onnxruntime``)."""
    for row in rows:
        row["variant"] = f"{row['backend']} c{row['concurrency']}"
        _ratios(row, _cell(rows, BASELINE, row["batch_size"], row["concurrency"]), BASELINE)
        if row["backend"] in TENSOR_TWIN:
            tensor = _cell(rows, TENSOR_TWIN[row["backend"]], row["batch_size"], row["concurrency"])
            _ratios(row, tensor, "tensor")
            row["extra_p50_ms_vs_tensor"] = row["p50_ms"] - tensor["p50_ms"] if tensor else None
            _ratios(row, _cell(rows, RAW_BASELINE, row["batch_size"], row["concurrency"]), RAW_BASELINE)


def _ratios(row: dict, base: dict | None, name: str) -> None:
    row[f"p50_vs_{name}"] = row["p50_ms"] / base["p50_ms"] if base and base["p50_ms"] else None
    row[f"rows_per_s_vs_{name}"] = row["rows_per_s"] / base["rows_per_s"] if base and base["rows_per_s"] else None


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for i, backend in enumerate(backends):
        color = f"C{i}"
        for conc, style in ((1, "-"), (4, "--")):
            cells = sorted(
                (r for r in rows if r["backend"] == backend and r["concurrency"] == conc), key=lambda r: r["batch_size"]
            )
            if not cells:
                continue
            xs = [r["batch_size"] for r in cells]
            marker = "s" if backend.startswith("perf_analyzer") else "o"
            left.plot(xs, [r["p50_ms"] for r in cells], style, marker=marker, color=color, label=f"{backend} c{conc}")
            right.plot(
                xs, [r["rows_per_s"] for r in cells], style, marker=marker, color=color, label=f"{backend} c{conc}"
            )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (rows per request)",
        ylabel="p50 latency (ms)",
        title="latency per request",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (rows per request)",
        ylabel="rows / s",
        title="throughput (c = concurrent clients)",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main --------------------------------------------------------------------------------------------
def measure_all(cfg: LatencyConfig, work: Path, log: Callable[[str], None]) -> tuple[list[dict], dict[str, Any]]:
    from recops.serving.client import Predictor
    from recops.serving.deploy import Deployer
    from recops.serving.export import ExportConfig, export_to_repository
    from recops.serving.repository import ServingOptions, WarmupRequest
    from recops.serving.server import ServerConfig, TritonServer

    threads = pin_threads(cfg.threads)
    t0 = time.perf_counter()
    ckpt = random_checkpoint(work / "checkpoint", cfg.table_size)
    instances = cfg.instances or cores()
    options = ServingOptions(
        max_batch_size=max(cfg.batch_sizes),
        intra_op_threads=threads,
        instance_count=instances,
        warmup=(WarmupRequest(batch_size=1, data="zero"),),
    )
    published = export_to_repository(ckpt, work / "repo", MODEL, config=ExportConfig(), options=options)
    log(
        f"exported ({published.record.exporter}, parity {published.parity.max_abs_diff:.2g}) in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    info: dict[str, Any] = {
        "exporter": published.record.exporter,
        "parity_max_abs_diff": published.parity.max_abs_diff,
        "onnx_bytes": published.onnx_path.stat().st_size,
        "threads": threads,
        "triton_instances": instances,
    }
    rows: list[dict] = []
    layout = published.record.layout
    with TritonServer(ServerConfig(repo=work / "repo")) as server:
        Deployer(server, work / "repo", MODEL).deploy(published.version)  # the tensor-level and raw-feature models
        backends = Backends(ckpt, published.onnx_path.parent, server, threads)
        with Predictor(server.http_url, RAW_MODEL) as raw_model:
            columns = raw_model.inputs()
        raws = {batch: raw_rows(backends.preprocessor, batch, columns) for batch in cfg.batch_sizes}
        try:
            for batch in cfg.batch_sizes:
                inputs = layout.random_inputs(batch, np.random.default_rng(batch))
                for conc in cfg.concurrency:
                    cells = {backend: Cell([], []) for backend in BACKENDS}
                    for _ in range(cfg.rounds):
                        for backend, cell in cells.items():
                            latencies, wall = run_round(backends.factory(backend, inputs, raws[batch]), conc, cfg)
                            cell.latencies.append(latencies)
                            cell.walls.append(wall)
                            backends.close()
                    rows += [
                        {"backend": backend, "batch_size": batch, "concurrency": conc, **cell.summary(batch)}
                        for backend, cell in cells.items()
                    ]
                log(f"batch {batch}: done ({time.perf_counter() - t0:.0f}s)")
        finally:
            backends.close()
        info["raw_breakdown"] = raw_breakdown(server, raws, cfg.seconds * cfg.rounds)
        info["perf_analyzer"] = run_perf_analyzer(cfg, server, layout, work, rows, log)
    return rows, info


def run_perf_analyzer(
    cfg: LatencyConfig, server, layout, work: Path, rows: list[dict], log: Callable[[str], None]
) -> dict[str, Any]:
    if not cfg.perf_analyzer:
        return {"ran": False, "reason": "disabled (--no-perf-analyzer)"}
    env, reason = perf_analyzer_env(cfg.cudart_dir)
    if env is None:
        log(f"perf_analyzer skipped: {reason}")
        return {"ran": False, "reason": reason}
    data = perf_analyzer_data(layout, work / "pa-data.json")
    try:
        for protocol in ("http", "grpc"):
            for batch in [b for b in (1, 1024) if b in cfg.batch_sizes]:
                for conc in cfg.concurrency:
                    rows.append(perf_analyzer_cell(env, server, protocol, batch, conc, data, 1.0))
    except (RecopsError, subprocess.TimeoutExpired) as exc:
        log(f"perf_analyzer failed: {exc}")
        return {"ran": False, "reason": str(exc)}
    return {"ran": True, "reason": "libcudart.so.12 + the wheel's libb64 put on LD_LIBRARY_PATH"}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--table-size", type=int, default=LatencyConfig.table_size, help="rows per embedding table")
    parser.add_argument(
        "--seconds",
        type=float,
        default=LatencyConfig.seconds,
        help="measured seconds per round of each cell (3 rounds)",
    )
    parser.add_argument("--batch-sizes", default=",".join(map(str, LatencyConfig.batch_sizes)))
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument(
        "--instances",
        type=int,
        default=LatencyConfig.instances,
        help="Triton model instances (0 = one per usable core)",
    )
    parser.set_defaults(threads=LatencyConfig.threads)  # 0 still means all cores
    parser.add_argument("--cudart-dir", default=None, help="directory with libcudart.so.12 (perf_analyzer needs it)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning on a shared host
    cfg = LatencyConfig(
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        table_size=args.table_size if not args.quick else 10_000,
        seconds=args.seconds if not args.quick else 0.2,
        threads=args.threads,
        instances=args.instances,
        perf_analyzer=not args.no_perf_analyzer,
        cudart_dir=args.cudart_dir,
    )
    if args.quick:
        cfg = LatencyConfig(**{**asdict(cfg), "batch_sizes": (1, 64, 1024), "warmup": 1})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="recops-serve-bench-") as tmp:
        rows, info = measure_all(cfg, Path(tmp), lambda m: print(f"[serve_latency] {m}", flush=True))
    goals = aims(rows)
    info["load_average"] = {"before": load_before, "after": os.getloadavg()}
    add_ratios(rows)
    path = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline=BASELINE,
        config=asdict(cfg),
        aims=goals,
        **info,
        plots=[
            {
                "x": "batch_size",
                "y": "p50_vs_onnxruntime",
                "series": "variant",
                "title": "p50 latency / in-process ONNX Runtime's (same batch, clients)",
                "log_x": True,
                "log_y": True,
            },
            {
                "x": "batch_size",
                "y": ["p50_ms", "p99_ms"],
                "series": "variant",
                "title": "latency percentiles (p50 solid, p99 dashed)",
                "log_x": True,
                "log_y": True,
            },
            {
                "x": "batch_size",
                "y": "rows_per_s",
                "series": "variant",
                "title": "throughput",
                "log_x": True,
                "log_y": True,
            },
            {
                "x": "batch_size",
                "y": ["p50_vs_tensor", "rows_per_s_vs_tensor"],
                "series": "variant",
                "title": "raw rows through the ensemble / model tensors, same protocol (p50 solid, rows/s dashed)",
                "log_x": True,
            },
        ],
    )
    load = max(info["load_average"]["before"][0], info["load_average"]["after"][0])
    png = plot(
        rows,
        Path(args.results_dir) / f"{NAME}.png",
        f"{hardware()['label']}; 1-min load average up to {load:.1f} during the run",
    )
    print(
        format_table(
            rows,
            [
                "backend",
                "batch_size",
                "concurrency",
                "requests",
                "p50_ms",
                "p99_ms",
                "rows_per_s",
                "p50_vs_onnxruntime",
                "rows_per_s_vs_onnxruntime",
                "extra_p50_ms_vs_tensor",
                "rows_per_s_vs_tensor",
                "rows_per_s_vs_preprocess_onnxruntime",
            ],
        )
    )
    print(format_table(info["raw_breakdown"]))
    print(json.dumps(goals, indent=1))
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
