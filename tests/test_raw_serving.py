"""The raw-feature model on a real Triton server: raw rows through the ensemble equal preprocessing + ONNX Runtime
in process (Criteo and a multi-hot spec, HTTP and gRPC), bad requests get 400s naming the column while the server
and its stubs stay up, the canary split happens in Triton (the same for stock tritonclient, plain HTTP, the request
id, `recops predict` and `recops score --url`), promote and rollback under concurrent clients fail no request, and
the README's curl request through `recops serve start`. One server for the module."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from recops.serving.client import Predictor
from recops.serving.deploy import DeployConfig, Deployer, in_canary
from recops.serving.export import export_onnx, publish
from recops.serving.onnx_model import ExportRecord, onnx_probabilities, onnx_session, read_preprocessor
from recops.serving.raw_features import raw_inputs
from recops.serving.repository import ModelRepository, ServingOptions
from recops.serving.server import http_address
from recops.training.readers import read_frame
from tests.conftest import ROOT, recops
from tests.model_fixtures import multi_hot_checkpoint, trained_checkpoint
from tests.triton_fixtures import processes_mentioning, running_server

FAST = DeployConfig(drain_s=0.5, warmup_requests=1)
MAX_BATCH = 256
CTR, TAGS = "ctr", "tags"  # Criteo with dense columns as text; a custom spec with a multi-hot column, dense FP32


@pytest.fixture(scope="module")
def criteo_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    return trained_checkpoint(tiny_dataset.path, "dlrm", tmp_path_factory)


@pytest.fixture(scope="module")
def repo(criteo_checkpoint, tmp_path_factory) -> ModelRepository:
    """ctr versions 1 and 2 (the same checkpoint), tags version 1."""
    repo = ModelRepository(tmp_path_factory.mktemp("raw-repo"))
    exported = export_onnx(criteo_checkpoint, tmp_path_factory.mktemp("export-ctr"))
    options = ServingOptions(max_batch_size=MAX_BATCH, raw_dense="BYTES")
    assert publish(exported, repo, CTR, options=options).raw_model == "ctr_raw"
    publish(exported, repo, CTR)
    _, checkpoint = multi_hot_checkpoint(tmp_path_factory)
    assert publish(export_onnx(checkpoint, tmp_path_factory.mktemp("export-tags")), repo, TAGS).raw_model == "tags_raw"
    return repo


@pytest.fixture(scope="module")
def server(repo):
    yield from running_server(repo.root)


@pytest.fixture(scope="module")
def deployers(server, repo) -> dict[str, Deployer]:
    deployers = {name: Deployer(server, repo, name, FAST) for name in (CTR, TAGS)}
    for deployer in deployers.values():
        assert deployer.deploy(1).production == 1
    return deployers


@pytest.fixture(scope="module")
def rows(synth_dir, tmp_path_factory, repo) -> dict[str, pd.DataFrame]:
    """Raw rows of each model's own format, with missing values."""
    data, _ = multi_hot_checkpoint(tmp_path_factory)
    frames = {
        CTR: read_frame(synth_dir / "data.tsv", read_preprocessor(repo.model_dir(CTR) / "1").spec).head(300),
        TAGS: read_frame(data.parent / "rows.csv", read_preprocessor(repo.model_dir(TAGS) / "1").spec).head(300),
    }
    assert frames[CTR].isna().any().any() and (frames[TAGS]["tags"].fillna("") == "").any()
    return frames


def in_process(repo: ModelRepository, name: str, version: int, frame: pd.DataFrame) -> np.ndarray:
    """The version's preprocessing + ONNX Runtime in this process."""
    folder = repo.model_dir(name) / str(version)
    features = read_preprocessor(folder).transform(frame)
    inputs = ExportRecord.read(folder).layout.features_inputs(features.dense, features.sparse, features.multi)
    return onnx_probabilities(onnx_session(folder / "model.onnx"), inputs)


def post(url: str, body: str | dict) -> tuple[int, dict | str]:
    """A plain HTTP POST of a JSON body: (status, answer)."""
    data = body if isinstance(body, str) else json.dumps(body)
    request = urllib.request.Request(url, data=data.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()).get("error", "")


def kserve_body(frame: pd.DataFrame, columns, **extra) -> dict:
    """A KServe v2 JSON request for raw rows (the form curl sends)."""
    tensors = raw_inputs(frame, columns)
    inputs = [
        {
            "name": name,
            "shape": list(t.shape),
            "datatype": "BYTES" if t.dtype == object else "FP32",
            "data": [v.decode() if isinstance(v, bytes) else float(v) for v in t.ravel()],
        }
        for name, t in tensors.items()
    ]
    return {"inputs": inputs, **extra}


def answered_version(answer: dict) -> list[int]:
    return next(o["data"] for o in answer["outputs"] if o["name"] == "model_version")


# ---- parity -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", [CTR, TAGS])
def test_raw_rows_through_the_ensemble_equal_in_process_preprocessing_and_onnxruntime(
    name, protocol, deployers, server, repo, rows
):
    url = server.http_url if protocol == "http" else server.grpc_url
    frame = rows[name]
    with Predictor(url, f"{name}_raw", protocol=protocol, batch_size=128) as predictor:
        declared = {t.name: t.dtype for t in predictor.inputs()}
        result = predictor.predict_rows(frame, version=1)
    assert declared["I1" if name == CTR else "x"] == ("BYTES" if name == CTR else "FP32")
    assert result.scores.shape == (300, 1) and len(result.model_versions) == 3  # 128 + 128 + 44 rows
    assert result.row_versions.tolist() == [1] * 300
    assert np.abs(result.scores - in_process(repo, name, 1, frame)).max() <= 1e-6


# ---- bad requests -------------------------------------------------------------------------------------------------
def test_bad_requests_get_400_naming_the_column_and_the_server_stays_up(deployers, server, repo, rows):
    url = f"{server.http_url}/v2/models/ctr_raw/infer"
    with Predictor(server.http_url, "ctr_raw") as predictor:
        columns = predictor.inputs()
    good = kserve_body(rows[CTR].head(2), columns)
    stubs = set(processes_mentioning(str(repo.root / "ctr_raw_preprocess")))
    assert len(stubs) == 1

    def changed(column: str, **fields) -> dict:
        return {"inputs": [{**t, **fields} if t["name"] == column else t for t in good["inputs"]]}

    cases = {
        "missing column": ({"inputs": good["inputs"][:-1]}, r"missing required input\(s\) \['C26'\]"),
        "wrong datatype": (changed("C1", datatype="FP32", data=[1.0, 2.0]), "input 'C1' data-type is 'FP32'"),
        "unparsable number": (
            changed("I3", data=["12", "twelve"]),
            r"column I3: 'twelve' \(row 1\) is not a number; send a decimal number",
        ),
        "oversized batch": (
            {
                "inputs": [
                    {**t, "shape": [MAX_BATCH + 1, 1], "data": t["data"][:1] * (MAX_BATCH + 1)} for t in good["inputs"]
                ]
            },
            f"batch-size must be <= {MAX_BATCH}",
        ),
        "unknown version": ({**good, "parameters": {"version": 9}}, r"model 'ctr' has versions \[1, 2\]; ask for one"),
    }
    for case, (body, message) in cases.items():
        status, error = post(url, body)
        assert status == 400 and re.search(message, error), (case, status, error)
    for path in ("/v2/models/nope_raw/infer", "/v2/models/ctr_raw/versions/9/infer"):
        status, error = post(f"{server.http_url}{path}", good)
        assert 400 <= status < 500 and "unknown model" in error.lower(), (path, status, error)

    assert server.is_ready()
    assert set(processes_mentioning(str(repo.root / "ctr_raw_preprocess"))) == stubs  # the same stub process
    status, answer = post(url, good)
    assert status == 200 and answered_version(answer) == [1, 1]


# ---- the split ----------------------------------------------------------------------------------------------------
def test_the_canary_split_is_made_in_triton_the_same_for_every_client(deployers, server, repo, rows, tmp_path):
    deployer = deployers[CTR]
    assert deployer.deploy(2, canary=0.5).canary == 2
    try:
        keys = [f"user-{i}" for i in range(16)]
        expected = [2 if in_canary(key, 0.5) else 1 for key in keys]
        assert set(expected) == {1, 2}
        frame = rows[CTR].head(3)
        with Predictor(server.http_url, "ctr_raw") as predictor:
            columns = predictor.inputs()
        tensors = raw_inputs(frame, columns)
        seen = {client: [] for client in ("tritonclient http", "tritonclient grpc", "plain http", "request id")}
        http = httpclient.InferenceServerClient(http_address(server.http_url))
        grpc = grpcclient.InferenceServerClient(http_address(server.grpc_url))
        try:
            for key in keys:
                for client, module in (("tritonclient http", httpclient), ("tritonclient grpc", grpcclient)):
                    inputs = []
                    for name, tensor in tensors.items():
                        inputs.append(module.InferInput(name, list(tensor.shape), "BYTES"))
                        inputs[-1].set_data_from_numpy(tensor)
                    answer = (http if module is httpclient else grpc).infer("ctr_raw", inputs, parameters={"key": key})
                    seen[client].append(int(answer.as_numpy("model_version")[0, 0]))
                status, answer = post(
                    f"{server.http_url}/v2/models/ctr_raw/infer", kserve_body(frame, columns, parameters={"key": key})
                )
                seen["plain http"].append(answered_version(answer)[0])
                status, answer = post(f"{server.http_url}/v2/models/ctr_raw/infer", kserve_body(frame, columns, id=key))
                assert status == 200 and answer["id"] == key and len(set(answered_version(answer))) == 1
                seen["request id"].append(answered_version(answer)[0])
        finally:
            http.close()
            grpc.close()
        assert seen == dict.fromkeys(seen, expected)

        frame.to_csv(tmp_path / "rows.tsv", sep="\t", header=False, index=False, columns=list(frame.columns[1:]))
        for key, version in zip(keys[:4], expected[:4]):
            out = json.loads(
                recops(
                    "predict",
                    "--name",
                    CTR,
                    "--input",
                    str(tmp_path / "rows.tsv"),
                    "--repo",
                    str(repo.root),
                    "--key",
                    key,
                    "--json",
                ).stdout.splitlines()[-1]
            )
            assert out["model"] == "ctr_raw" and out["row_versions"] == [version] * 3
            assert np.abs(np.array(out["predictions"]) - in_process(repo, CTR, version, frame).ravel()).max() <= 1e-6
        recops(
            "score",
            "--url",
            server.http_url,
            "--name",
            CTR,
            "--repo",
            str(repo.root),
            "--input",
            str(tmp_path / "rows.tsv"),
            "--output",
            str(tmp_path / "scores.csv"),
            "--json",
        )
        scores = pd.read_csv(tmp_path / "scores.csv")
        assert len(scores) == 3 and set(scores["version"]) <= {1, 2} and scores["version"].nunique() == 1
        np.testing.assert_allclose(scores["score"], in_process(repo, CTR, 1, frame).ravel(), atol=1e-6)
    finally:
        assert deployer.rollback().canary is None


def test_promote_and_rollback_under_concurrent_raw_clients_fail_no_request(deployers, server, repo, rows):
    """Three clients (tritonclient HTTP and gRPC, plain HTTP) send keyed raw requests while a canary starts, is
    promoted, another starts and is rolled back. Each phase waits for the traffic to show it (cap 120 s)."""
    deployer, frame = deployers[CTR], rows[CTR].head(4)
    with Predictor(server.http_url, "ctr_raw") as predictor:
        body = kserve_body(frame, predictor.inputs())
    stop, failures, served, phase = threading.Event(), [], Counter(), ["production 1"]
    deadline = time.monotonic() + 120

    def client(kind: str) -> None:
        url = server.http_url if kind != "grpc" else server.grpc_url
        with Predictor(url, "ctr_raw", protocol="grpc" if kind == "grpc" else "http", timeout_s=30) as predictor:
            sent = 0
            while not stop.is_set() and time.monotonic() < deadline:
                sent, started = sent + 1, phase[0]
                try:
                    if kind == "plain":
                        status, answer = post(f"{server.http_url}/v2/models/ctr_raw/infer", {**body, "id": f"p-{sent}"})
                        assert status == 200, answer
                        versions = answered_version(answer)
                    else:
                        versions = predictor.predict_rows(frame, key=f"{kind}-{sent}").row_versions.tolist()
                    assert len(set(versions)) == 1
                    served[(started, versions[0])] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    failures.append(f"{kind}: {type(exc).__name__}: {exc}")

    def seen(name: str, version: int) -> None:
        while served[(name, version)] < 5 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)

    def phase_of(name: str) -> None:
        phase[0] = name

    threads = [threading.Thread(target=client, args=(kind,)) for kind in ("http", "grpc", "plain")]
    for t in threads:
        t.start()
    try:  # a phase names what may answer: it starts before a version is added, after one is removed
        seen("production 1", 1)
        phase_of("canary 2")
        deployer.deploy(2, canary=0.5)
        seen("canary 2", 2)
        assert deployer.promote().production == 2
        phase_of("production 2")
        seen("production 2", 2)
        phase_of("canary 1")
        deployer.deploy(1, canary=0.5)
        seen("canary 1", 1)
        assert deployer.rollback().canary is None
        phase_of("rolled back")
        seen("rolled back", 2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    by_phase = {p: {v for (q, v) in served if q == p} for p, _ in served}
    assert by_phase == {
        "production 1": {1},
        "canary 2": {1, 2},
        "production 2": {2},
        "canary 1": {1, 2},
        "rolled back": {2},
    }, served


# ---- the README ---------------------------------------------------------------------------------------------------
def test_the_readme_curl_request(criteo_checkpoint, tmp_path, monkeypatch):
    """What README.md "Raw features in the server" says this test runs."""
    readme = (ROOT / "README.md").read_text()
    body = re.search(r"infer -H 'Content-Type: application/json' -d @- <<'EOF'\n(.*?)\nEOF\n", readme, re.S).group(1)
    request = json.loads(body)
    monkeypatch.setenv("RECOPS_RUNS", str(tmp_path / "runs"))
    repo = tmp_path / "repo"
    exported = json.loads(
        recops(
            "export", "--checkpoint", str(criteo_checkpoint), "--name", "dlrm", "--repo", str(repo), "--json"
        ).stdout.splitlines()[-1]
    )
    assert exported["raw_model"] == "dlrm_raw" and exported["version"] == 1
    started = json.loads(recops("serve", "start", "--repo", str(repo), "--json").stdout.splitlines()[-1])
    try:
        recops("deploy", "--name", "dlrm", "--version", "1", "--repo", str(repo), "--json")
        status, answer = post(f"{started['http_url']}/v2/models/dlrm_raw/infer", body)
    finally:
        recops("serve", "stop", "--repo", str(repo))
    assert processes_mentioning(str(repo)) == []
    assert status == 200 and answer["id"] == "user-42" and answer["model_name"] == "dlrm_raw"
    assert answered_version(answer) == [1]
    served = next(o["data"][0] for o in answer["outputs"] if o["name"] == "probability")

    line = "\t".join("" if (v := t["data"][0]) != v or v == "" else str(v) for t in request["inputs"])
    (tmp_path / "row.tsv").write_text(line + "\n")
    recops(
        "score",
        "--checkpoint",
        str(criteo_checkpoint),
        "--input",
        str(tmp_path / "row.tsv"),
        "--output",
        str(tmp_path / "score.csv"),
    )
    assert abs(pd.read_csv(tmp_path / "score.csv")["score"].iloc[0] - served) <= 1e-6
