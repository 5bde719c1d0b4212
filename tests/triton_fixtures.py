"""Shared pieces for tests that serve a real ONNX model from a real Triton server.

Import the fixtures into a test module (``from tests.triton_fixtures import triton_server``); each
module then gets its own server, stopped (with its stub processes) when the module ends.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from recops.serving.repository import DynamicBatching, ModelRepository, ServingOptions, VersionPolicy, WarmupRequest
from recops.serving.server import ServerConfig, TritonServer, triton_processes

TINY = "tiny"
TABLE_SIZE = 1000  # ids the tiny model accepts: [0, TABLE_SIZE)
TINY_OPTIONS = ServingOptions(
    max_batch_size=1024,
    dynamic_batching=DynamicBatching((4, 8), 100),
    version_policy=VersionPolicy("latest", latest_n=2),
    warmup=(WarmupRequest(batch_size=2),),
    intra_op_threads=1,
)


def export_tiny(path: Path, seed: int) -> Path:
    """A small CTR model: dense [B, 13] f32 + sparse [B, 26] i64 -> prob [B, 1], exported with dynamo."""
    import torch

    class TinyCTR(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(TABLE_SIZE, 4)
            self.top = torch.nn.Linear(13 + 26 * 4, 1)

        def forward(self, dense, sparse):
            return torch.sigmoid(self.top(torch.cat([dense, self.emb(sparse).flatten(1)], dim=1)))

    torch.manual_seed(seed)
    batch = torch.export.Dim("batch")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        TinyCTR().eval(),
        (torch.randn(4, 13), torch.randint(0, TABLE_SIZE, (4, 26))),
        str(path),
        input_names=["dense", "sparse"],
        output_names=["prob"],
        dynamo=True,
        dynamic_shapes={"dense": {0: batch}, "sparse": {0: batch}},
        verbose=False,
    )
    return path


def tiny_onnx_file(tmp_path_factory: pytest.TempPathFactory, seed: int = 0) -> Path:
    """The tiny model for ``seed``, exported once per test session (cached in the session's temp dir)."""
    path = tmp_path_factory.getbasetemp() / f"tiny-onnx-seed{seed}" / "model.onnx"
    return path if path.is_file() else export_tiny(path, seed)


def tiny_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "dense": rng.random((rows, 13), dtype=np.float32),
        "sparse": rng.integers(0, TABLE_SIZE, (rows, 26), dtype=np.int64),
    }


def onnx_outputs(onnx_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference outputs from a local onnxruntime session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (independent check with pgrep)."""
    found = subprocess.run(["pgrep", "-a", "-f", text], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return tiny_onnx_file(tmp_path_factory)


@pytest.fixture(scope="module")
def triton_repo(tmp_path_factory, tiny_onnx) -> ModelRepository:
    repo = ModelRepository(tmp_path_factory.mktemp("triton-repo"))
    repo.add_version(TINY, tiny_onnx, options=TINY_OPTIONS)
    return repo


@pytest.fixture(scope="module")
def triton_server(triton_repo):
    """A real server over ``triton_repo`` with ``tiny`` loaded; stopped, stubs included, after the module."""
    yield from running_server(triton_repo.root, load_models=(TINY,))


def running_server(repo: Path, load_models: tuple[str, ...] = ()):
    """Fixture body: a started server, then stopped with a check that no server or stub process is left."""
    server = TritonServer(ServerConfig(repo=repo, load_models=load_models)).start()
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
    assert triton_processes(pid) == [], "server or python-backend stub left running"


def parsed(config: Path) -> dict:
    """A config.pbtxt as Triton reads it: parsed with Triton's own ModelConfig schema (unknown fields fail)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
