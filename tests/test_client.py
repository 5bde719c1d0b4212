"""Predictor over real HTTP and gRPC: results equal local onnxruntime, batching, versions and request ids,
every failure a ServingError with the server's message, and the python model's batched execution."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import onnx
import pandas as pd
import pytest
import tritonclient.http as httpclient

from recops.serving.client import Predictor, features_to_inputs
from recops.serving.errors import ServingError
from recops.serving.repository import DynamicBatching, ServingOptions
from recops.serving.server import free_port
from recops.training.preprocess import Preprocessor
from recops.training.spec import CRITEO_DENSE, CRITEO_SPARSE, ColumnSpec, PreprocessConfig
from tests.triton_fixtures import (  # noqa: F401
    TABLE_SIZE,
    TINY,
    onnx_outputs,
    tiny_inputs,
    tiny_onnx,
    triton_repo,
    triton_server,
)

BATCHED = "tiny_batched"  # dispatches once 4 rows are queued, so 4 concurrent 1-row requests run as one batch


@pytest.fixture(scope="module")
def server(triton_repo, tiny_onnx, triton_server):
    triton_repo.add_version(
        BATCHED, tiny_onnx, options=ServingOptions(max_batch_size=8, dynamic_batching=DynamicBatching((4,), 5_000_000))
    )
    triton_server.load(BATCHED)
    return triton_server


def url_for(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predictions_equal_onnxruntime_in_chunks(server, tiny_onnx, protocol):
    inputs = tiny_inputs(2500)
    expected = onnx_outputs(tiny_onnx, inputs)["prob"]
    with Predictor(url_for(server, protocol), TINY, protocol=protocol, batch_size=1000) as predictor:
        result = predictor.predict(inputs, request_id="req")
        np.testing.assert_allclose(result.outputs["prob"], expected, rtol=1e-5, atol=1e-7)
        assert result.model_versions == ("1", "1", "1")
        assert result.request_ids == ("req-0", "req-1", "req-2")
        np.testing.assert_allclose(predictor.predict_arrays(inputs, model_version=1), expected, rtol=1e-5, atol=1e-7)
    with Predictor(url_for(server, protocol), TINY, protocol=protocol, batch_size=5000) as predictor:
        assert len(predictor.predict(inputs).model_versions) == 3  # capped by the model's max_batch_size 1024


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_raise_serving_error_with_the_server_message(server, protocol):
    good = tiny_inputs(3)
    cases = [
        ({"dense": good["dense"][:, :5], "sparse": good["sparse"]}, TINY, "", "unexpected shape for input 'dense'"),
        ({"dense": good["dense"], "sparse": good["sparse"].astype(np.int32)}, TINY, "", "INT32.*expects 'INT64'"),
        ({"dense": good["dense"]}, TINY, "", "missing required input.*sparse"),
        (good, TINY, "7", "'tiny' version 7 is not found"),
        (good, "no_such_model", "", "unknown model: 'no_such_model'"),
        ({"dense": good["dense"][:2], "sparse": good["sparse"]}, TINY, "", "same, non-zero number of rows"),
    ]
    for inputs, model, version, message in cases:
        with (
            Predictor(url_for(server, protocol), model, protocol=protocol) as predictor,
            pytest.raises(ServingError, match=message),
        ):
            predictor.predict_arrays(inputs, model_version=version)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_refused_and_timed_out_connections_raise_serving_error(protocol):
    with pytest.raises(ServingError, match="(?i)refused"):
        Predictor(f"127.0.0.1:{free_port()}", TINY, protocol=protocol, timeout_s=2).predict_arrays(tiny_inputs(1))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        predictor = Predictor(f"127.0.0.1:{silent.getsockname()[1]}", TINY, protocol=protocol, timeout_s=0.5)
        with pytest.raises(ServingError, match="(?i)timed out|deadline"):
            predictor.predict_arrays(tiny_inputs(1))
        predictor.close()


def _one_row_each(url: str, rows: list[dict[str, np.ndarray]]) -> list:
    def score(row):
        with Predictor(url, BATCHED) as predictor:
            try:
                return predictor.predict_arrays(row)
            except ServingError as exc:
                return exc

    with ThreadPoolExecutor(len(rows)) as pool:
        return list(pool.map(score, rows))


def _executions(server) -> int:
    client = httpclient.InferenceServerClient(server.http_url.split("://")[1])
    try:
        return int(client.get_inference_statistics(BATCHED)["model_stats"][0]["execution_count"])
    finally:
        client.close()


def test_batched_requests_run_together_and_a_bad_one_fails_alone(server, tiny_onnx):
    inputs = tiny_inputs(4)
    rows = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(4)]
    expected = onnx_outputs(tiny_onnx, inputs)["prob"]
    before = _executions(server)
    results = _one_row_each(server.http_url, rows)
    assert _executions(server) == before + 1, "4 queued rows should run as one batch"
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-5, atol=1e-7)

    rows[2] = {"dense": rows[2]["dense"], "sparse": np.full((1, 26), TABLE_SIZE + 5, np.int64)}  # out of table
    results = _one_row_each(server.http_url, rows)
    assert isinstance(results[2], ServingError) and "onnxruntime" in str(results[2])
    for i in (0, 1, 3):
        np.testing.assert_allclose(results[i], expected[i : i + 1], rtol=1e-5, atol=1e-7)


def _raw_frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    frame = {
        name: np.where(rng.random(rows) < 0.2, np.nan, rng.integers(0, 100, rows).astype(float))
        for name in CRITEO_DENSE
    }
    frame |= {
        name: [None if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}" for _ in range(rows)]
        for name in CRITEO_SPARSE
    }
    return pd.DataFrame(frame)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predict_frame_applies_the_shared_preprocessing(server, tiny_onnx, protocol):
    preprocessor = Preprocessor(ColumnSpec.criteo(), PreprocessConfig(table_size=TABLE_SIZE))
    frame = _raw_frame(50)
    features = preprocessor.transform(frame)
    expected = onnx_outputs(tiny_onnx, {"dense": features.dense, "sparse": features.sparse})["prob"]
    with Predictor(url_for(server, protocol), TINY, protocol=protocol, preprocess=preprocessor.transform) as p:
        np.testing.assert_allclose(p.predict_frame(frame), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ServingError, match="needs Predictor.preprocess"):
        Predictor(url_for(server, protocol), TINY, protocol=protocol).predict_frame(frame)


def test_features_map_to_the_export_input_names():
    multi = np.array([[3, 4, -1], [-1, -1, -1]])
    features = SimpleNamespace(
        dense=np.zeros((2, 13), np.float32), sparse=np.zeros((2, 26), np.int64), multi={"tags": multi}
    )
    inputs = features_to_inputs(features)
    assert list(inputs) == ["dense", "sparse", "multi_tags", "mask_tags"]
    np.testing.assert_array_equal(inputs["mask_tags"], [[True, True, False], [False, False, False]])
    with pytest.raises(ServingError, match="protocol 'rest' is unknown"):
        Predictor("127.0.0.1:1", TINY, protocol="rest")


def _nan_bias_copy(tiny_onnx, path) -> str:
    """The tiny model with a NaN output bias: every score it makes is NaN."""
    model = onnx.load(str(tiny_onnx))
    bias = next(t for t in model.graph.initializer if t.name == "top.bias")
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(bias.dims), np.nan, np.float32), bias.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def test_non_finite_scores_never_come_back_with_http_200(server, triton_repo, tiny_onnx, tmp_path):
    """The served python model answers a request whose scores are not finite with an error: a raw HTTP request
    gets no 200, the client raises, and in a dynamic batch only the offending request fails."""
    nan_model = _nan_bias_copy(tiny_onnx, tmp_path / "nan" / "model.onnx")
    triton_repo.add_version("tiny_nan", nan_model, options=ServingOptions(warmup=()))  # warm-up would fail the load
    server.load("tiny_nan")
    inputs = tiny_inputs(2)
    body = json.dumps(
        {
            "inputs": [
                {"name": name, "shape": list(a.shape), "datatype": dtype, "data": a.ravel().tolist()}
                for (name, a), dtype in zip(inputs.items(), ("FP32", "INT64"))
            ]
        }
    ).encode()
    request = urllib.request.Request(f"{server.http_url}/v2/models/tiny_nan/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code != 200 and "non-finite" in answer.value.read().decode()
    for protocol in ("http", "grpc"):
        with pytest.raises(ServingError, match="non-finite"):
            Predictor(url_for(server, protocol), "tiny_nan", protocol=protocol).predict(inputs)

    rows = [{k: v[i : i + 1] for k, v in tiny_inputs(4).items()} for i in range(4)]
    rows[1] = {"dense": np.full((1, 13), np.nan, np.float32), "sparse": rows[1]["sparse"]}  # tiny has no input guard
    results = _one_row_each(server.http_url, rows)
    assert isinstance(results[1], ServingError) and "non-finite" in str(results[1])
    assert all(np.isfinite(results[i]).all() for i in (0, 2, 3))


def test_the_client_refuses_non_finite_scores_a_server_sends(server, triton_repo, tmp_path):
    """A hand-written python model that answers NaN with a 200 (as a GPU target's onnxruntime backend would): the
    client raises instead of passing the NaN on."""
    folder = triton_repo.model_dir("raw_nan")
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(
        'name: "raw_nan"\nbackend: "python"\nmax_batch_size: 8\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (folder / "1" / "model.py").write_text(
        "import numpy as np\nimport triton_python_backend_utils as pb\n\n\nclass TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        return [pb.InferenceResponse([pb.Tensor('y', np.full((len(pb.get_input_tensor_by_name(r, 'x')"
        ".as_numpy()), 1), np.nan, np.float32))]) for r in requests]\n"
    )
    server.load("raw_nan")
    with pytest.raises(ServingError, match=r"model 'raw_nan' version 1 .*output 'y'.* 2 non-finite"):
        Predictor(server.http_url, "raw_nan").predict({"x": np.ones((2, 1), np.float32)})
