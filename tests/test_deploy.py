"""Deployments on a real Triton server: HTTP/gRPC parity with local ONNX Runtime, metadata, hot reload under
load with zero failed requests, canary routing, promote/rollback, refused corrupt and NaN versions, and the
`recops deploy` command. One server and one trained checkpoint for the whole module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from recops.serving.client import Predictor
from recops.serving.deploy import DeployConfig, Deployer, DeployError, Router, in_canary, read_deploy_state
from recops.serving.export import export_onnx, publish
from recops.serving.onnx_model import PREPROCESS_FILE, ExportRecord, onnx_probabilities, onnx_session
from recops.serving.repository import ModelRepository
from recops.serving.server import TritonServer
from recops.training.preprocess import Preprocessor
from recops.training.readers import read_frame
from tests.conftest import ROOT, recops
from tests.model_fixtures import trained_checkpoint
from tests.triton_fixtures import running_server

NAME = "ctr"
FAST = DeployConfig(drain_s=0.5, warmup_requests=1)


@pytest.fixture(scope="module")
def repo(tiny_dataset, tmp_path_factory) -> ModelRepository:
    """Versions 1 (dlrm), 2 (dcn), 3 (dlrm again), all gated."""
    repo = ModelRepository(tmp_path_factory.mktemp("deploy-repo"))
    exports = {
        family: export_onnx(
            trained_checkpoint(tiny_dataset.path, family, tmp_path_factory), tmp_path_factory.mktemp(f"export-{family}")
        )
        for family in ("dlrm", "dcn")
    }
    for family in ("dlrm", "dcn", "dlrm"):
        publish(exports[family], repo, NAME)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    yield from running_server(repo.root)


@pytest.fixture(scope="module")
def deployer(server, repo) -> Deployer:
    deployer = Deployer(server, repo, NAME, FAST)
    assert deployer.deploy(1).production == 1
    return deployer


def probe(repo: ModelRepository, version: int, rows: int, seed: int = 1) -> dict[str, np.ndarray]:
    record = ExportRecord.read(repo.model_dir(NAME) / str(version))
    return record.layout.random_inputs(rows, np.random.default_rng(seed))


def local_scores(repo: ModelRepository, version: int, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return onnx_probabilities(onnx_session(repo.model_dir(NAME) / str(version) / "model.onnx"), inputs)


def ready_versions(server: TritonServer) -> list[int]:
    return sorted(int(m["version"]) for m in server.models() if m["name"] == NAME and m.get("state") == "READY")


def assert_production_answers(server: TritonServer, repo: ModelRepository) -> None:
    state = read_deploy_state(repo, NAME)
    inputs = probe(repo, state.production, 16)
    with Router(server.http_url, repo, NAME) as router:
        routed = router.predict(inputs, key="anyone")
    assert routed.version == state.production and routed.arm == "production"
    assert np.abs(routed.scores - local_scores(repo, state.production, inputs)).max() <= 1e-5
    assert ready_versions(server) == sorted(state.loaded)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_scores_equal_local_onnxruntime(protocol, deployer, server, repo):
    url = server.http_url if protocol == "http" else server.grpc_url
    inputs = probe(repo, 1, 700)
    with Predictor(url, NAME, protocol=protocol, batch_size=256) as predictor:
        result = predictor.predict(inputs, model_version=1)
        metadata, config = predictor.metadata(), predictor.config()
    # the export's serving options survive the deployment, which only sets the version policy
    assert int(config["max_batch_size"]) == 4096  # gRPC's JSON carries int64 as strings
    assert [int(v) for v in config["version_policy"]["specific"]["versions"]] == [1]
    assert result.model_versions == ("1", "1", "1")  # 700 rows in three requests
    assert np.abs(result.outputs["probability"] - local_scores(repo, 1, inputs)).max() <= 1e-5
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == [
        ("dense", "FP32", [-1, 13]),
        ("sparse", "INT64", [-1, 26]),
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]] == [
        ("probability", "FP32", [-1, 1])
    ]


def test_raw_rows_with_the_exported_preprocessor(deployer, server, repo, synth_dir):
    version_dir = repo.model_dir(NAME) / "1"
    preprocessor = Preprocessor.from_dict(json.loads((version_dir / PREPROCESS_FILE).read_text()))
    frame = read_frame(synth_dir / "data.tsv", preprocessor.spec).head(50)
    with Predictor(server.grpc_url, NAME, protocol="grpc", preprocess=preprocessor.transform) as predictor:
        served = predictor.predict_frame(frame, model_version=1)
    features = preprocessor.transform(frame)
    expected = local_scores(repo, 1, {"dense": features.dense, "sparse": features.sparse})
    assert served.shape == (50, 1) and np.abs(served - expected).max() <= 1e-5


def test_canary_split_is_deterministic_per_key():
    keys = [f"user-{i}" for i in range(10_000)]
    share = sum(in_canary(k, 0.2) for k in keys) / len(keys)
    assert 0.18 < share < 0.22
    assert [in_canary(k, 0.2) for k in keys[:100]] == [in_canary(k, 0.2) for k in keys[:100]]
    assert not any(in_canary(k, 0.0) for k in keys) and all(in_canary(k, 1.0) for k in keys)


def test_hot_reload_under_load_fails_no_request(deployer, server, repo):
    """4 threads send keyed requests while two versions are deployed, one as a canary, then promoted.

    Each step waits until the traffic shows the new routing, so the sequence does not depend on speed; the
    generator stops when the sequence ends (hard cap 60 s, 5000 requests per thread)."""
    stop, failures, served = threading.Event(), [], Counter()
    deadline = time.monotonic() + 60.0

    def client(worker: int) -> None:
        inputs = probe(repo, 1, 8, seed=worker)
        with Router(server.http_url, repo, NAME, timeout_s=30) as router:
            sent = 0
            while not stop.is_set() and time.monotonic() < deadline and sent < 5000:
                sent += 1
                try:
                    routed = router.predict(inputs, key=f"w{worker}-r{sent}")
                    assert routed.scores.shape == (8, 1) and np.isfinite(routed.scores).all()
                    served[(routed.version, routed.arm)] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                    failures.append(f"{type(exc).__name__}: {exc}")

    def seen(version: int, arm: str) -> None:
        while served[(version, arm)] < 5 and time.monotonic() < deadline and not failures:
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        seen(1, "production")
        assert deployer.deploy(2).production == 2
        seen(2, "production")
        canary = deployer.deploy(3, canary=0.5)
        assert (canary.production, canary.canary, canary.status) == (2, 3, "canary")
        seen(3, "canary")
        promoted = deployer.promote()
        assert (promoted.production, promoted.canary, promoted.previous) == (3, None, 2)
        seen(3, "production")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert {(1, "production"), (2, "production"), (3, "canary"), (3, "production")} <= set(served), served
    assert not {arm for (version, arm) in served if version != 3} - {"production"}
    assert ready_versions(server) == [3]


def test_rollback_drops_a_canary_then_restores_the_previous_production_and_is_idempotent(deployer, server, repo):
    """A rollback drops a canary, or without one brings the previous production back; a second rollback right
    after either has nothing to roll back (it never brings back the version the first one rolled back)."""
    old = deployer.state().production
    candidate = next(v for v in repo.versions(NAME) if v != old and v in (1, 2, 3))
    assert deployer.deploy(candidate, canary=0.3).canary == candidate
    dropped = deployer.rollback()
    assert (dropped.production, dropped.canary, dropped.status) == (old, None, "serving")
    with pytest.raises(DeployError, match="nothing to roll back"):
        deployer.rollback()
    assert_production_answers(server, repo)

    assert deployer.deploy(candidate).production == candidate
    restored = deployer.rollback()
    assert (restored.production, restored.previous) == (old, None)  # nothing left to roll back to
    with pytest.raises(DeployError, match="nothing to roll back"):
        deployer.rollback()
    state = deployer.state()
    assert (state.production, state.canary) == (old, None)
    assert_production_answers(server, repo)


def export_onnx_like(version_dir: Path, out: Path) -> Path:
    """A copy of a version's ONNX file and export.json in a directory of its own."""
    out.mkdir()
    for name in ("model.onnx", "export.json"):
        shutil.copyfile(version_dir / name, out / name)
    return out


def _hand_written_version(repo: ModelRepository, source: int) -> tuple[int, Path]:
    """A copy of version ``source`` as a new version directory (bypassing export and its gate)."""
    version = repo.versions(NAME)[-1] + 1
    target = repo.model_dir(NAME) / str(version)
    shutil.copytree(repo.model_dir(NAME) / str(source), target)
    return version, target


def test_unreadable_onnx_is_refused_and_production_keeps_serving(deployer, server, repo):
    before = deployer.state().production
    version, folder = _hand_written_version(repo, before)
    (folder / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf")
    with pytest.raises(DeployError, match=f"version {version} refused and rolled back: .*not a readable ONNX"):
        deployer.deploy(version)
    state = deployer.state()
    assert (state.production, state.canary, state.status) == (before, None, "rolled_back")
    assert state.history[-1]["action"] == "rejected" and state.history[-1]["version"] == version
    assert_production_answers(server, repo)


def test_version_that_fails_to_load_is_rolled_back(deployer, server, repo, tmp_path):
    """External weights truncated: the graph reads fine, onnxruntime cannot load it; refused before the server ever
    loads it (a failed load whose client died can crash Triton 2.51)."""
    before = deployer.state().production
    source = repo.model_dir(NAME) / "1"
    exported = export_onnx_like(source, tmp_path / "export")
    model = onnx.load(str(exported / "model.onnx"))
    onnx.save_model(model, str(exported / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    version = repo.add_version(NAME, exported / "model.onnx", extra_files=[exported / "export.json"])
    config = (repo.model_dir(NAME) / "config.pbtxt").read_text()
    assert f"specific: {{ versions: [{before}] }}" in config  # adding a version did not change what is served
    data = repo.model_dir(NAME) / str(version) / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(DeployError, match=f"version {version} refused and rolled back: .*ONNX Runtime cannot run"):
        deployer.deploy(version, canary=0.5)
    assert deployer.state().production == before and deployer.state().canary is None
    assert not [m for m in server.models() if m.get("version") == str(version)], "the server never saw it"
    assert_production_answers(server, repo)


def nan_version(repo: ModelRepository) -> int:
    """A version directory written by hand (no export, no gate): a copy of version 1 whose final bias is NaN."""
    version, folder = _hand_written_version(repo, 1)
    model = onnx.load(str(folder / "model.onnx"))
    bias = max(
        (t for t in model.graph.initializer if t.name.startswith("head.over_arch") and "bias" in t.name),
        key=lambda t: int(t.name.split(".")[2]),
    )
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(bias.dims), np.nan, np.float32), bias.name))
    onnx.save(model, str(folder / "model.onnx"))
    return version


def test_nan_scores_are_refused_and_production_keeps_serving(deployer, server, repo):
    before = deployer.state().production
    version = nan_version(repo)
    with pytest.raises(DeployError, match=f"version {version} refused and rolled back: .*non-finite"):
        deployer.deploy(version)
    assert deployer.state().production == before
    assert_production_answers(server, repo)


def test_deploy_command(deployer, server, repo):
    state = deployer.state()
    candidate = next(v for v in (1, 2, 3) if v != state.production)
    common = ["--name", NAME, "--repo", str(repo.root), "--url", server.http_url, "--drain", "0.2", "--json"]
    out = json.loads(recops("deploy", "--version", str(candidate), "--canary", "0.25", *common).stdout.splitlines()[-1])
    assert (out["production_version"], out["canary_version"], out["status"]) == (state.production, candidate, "canary")
    out = json.loads(recops("deploy", "--promote", *common).stdout.splitlines()[-1])
    assert (out["production_version"], out["canary_version"], out["status"]) == (candidate, None, "serving")
    assert_production_answers(server, repo)
    missing = recops("deploy", "--version", "99", *common, check=False)
    assert missing.returncode == 2 and "has no version 99" in missing.stderr


def served_versions_of(server: TritonServer, version: int) -> list[dict]:
    """Every model entry (any name: the deployed one or a staging one) of ``version`` the server loads or holds."""
    return [m for m in server.models() if m.get("version") == str(version) and m.get("state") in ("LOADING", "READY")]


def test_a_killed_deploy_never_leaves_an_unchecked_version_reachable(deployer, server, repo, synth_dir, tmp_path):
    """`recops deploy` of a new version is SIGKILLed the moment the server holds that version (in any form: it is
    unchecked then); meanwhile a client asks the model name (no version) all the time. No answer may come from the
    unchecked version, and the next command (`recops predict`) recovers the deployment: production serving alone,
    finite scores."""
    before = deployer.state().production
    version, _ = _hand_written_version(repo, before)
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join((synth_dir / "data.tsv").read_text().splitlines(keepends=True)[:20]))
    common = ["--name", NAME, "--repo", str(repo.root), "--url", server.http_url, "--json"]
    answered, stop = Counter(), threading.Event()

    def client() -> None:
        inputs = probe(repo, before, 4)
        with Predictor(server.http_url, NAME, timeout_s=30) as predictor:
            while not stop.is_set():
                try:
                    result = predictor.predict(inputs)
                    answered[(result.model_versions[0], bool(np.isfinite(result.outputs["probability"]).all()))] += 1
                except Exception:  # noqa: BLE001 - an error is not an answer; only answers are counted
                    answered["error"] += 1
                time.sleep(0.01)

    thread = threading.Thread(target=client)
    thread.start()
    deploy = subprocess.Popen(
        [sys.executable, "-m", "recops.cli", "deploy", "--version", str(version), *common],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while deploy.poll() is None and time.monotonic() < deadline and not served_versions_of(server, version):
            time.sleep(0.02)
        killed = deploy.poll() is None
        deploy.kill()
        deploy.wait(timeout=30)
        time.sleep(1.0)  # requests keep coming after the kill
    finally:
        stop.set()
        thread.join(timeout=60)
    assert killed, "the deploy ended before the server ever held the new version"
    assert not [k for k in answered if k != "error" and (k[0] == str(version) or not k[1])], answered

    scored = json.loads(recops("predict", "--input", str(rows), *common).stdout.splitlines()[-1])
    assert scored["versions"] == [str(before)] and np.isfinite(scored["predictions"]).all()
    status = json.loads(recops("deploy", "--status", *common).stdout.splitlines()[-1])
    assert (status["production_version"], status["canary_version"]) == (before, None)
    assert read_deploy_state(repo, NAME).history[-1]["action"] == "recovered"
    assert ready_versions(server) == [before] and not served_versions_of(server, version)
    assert not list(repo.root.glob(".check-*")), "staging model left behind"
    assert_production_answers(server, repo)


def test_out_of_range_ids_and_non_finite_dense_values_are_guarded_alike(deployer, server, repo):
    """Negative and too-large ids score as the reserved id 0 and NaN/inf dense values as 0 (what preprocessing makes
    of a missing value), identically on Triton's python-backend model (HTTP and gRPC clients) and in-process ONNX
    Runtime: the guard is inside the exported graph."""
    version = deployer.state().production
    clean = probe(repo, version, 48, seed=5)
    dirty = {name: array.copy() for name, array in clean.items()}
    dirty["sparse"][0::3, 0], dirty["sparse"][1::3, 1] = -7, 10**12
    dirty["dense"][0::4, 0], dirty["dense"][1::4, 3], dirty["dense"][2::4, 5] = np.nan, np.inf, -np.inf
    missing = {name: array.copy() for name, array in clean.items()}
    missing["sparse"][0::3, 0], missing["sparse"][1::3, 1] = 0, 0
    missing["dense"][0::4, 0], missing["dense"][1::4, 3], missing["dense"][2::4, 5] = 0.0, 0.0, 0.0
    expected = local_scores(repo, version, missing)
    assert np.abs(local_scores(repo, version, dirty) - expected).max() <= 1e-6
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        with Predictor(url, NAME, protocol=protocol) as predictor:
            served = predictor.predict_arrays(dirty, model_version=version)
        assert np.isfinite(served).all() and np.abs(served - expected).max() <= 1e-5
