"""The local Triton launcher on a real server: config round trip, state file, model control, versions,
startup failures, and the `recops serve` / `recops predict` commands, leaving no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from recops.errors import RecopsError
from recops.serving.client import Predictor
from recops.serving.errors import ServingError
from recops.serving.repository import ModelRepository, ServingOptions, VersionPolicy
from recops.serving.server import STATE_FILE, ServerConfig, TritonServer, free_port, read_state, triton_processes
from recops.training.preprocess import Preprocessor
from recops.training.spec import CRITEO_DENSE, CRITEO_SPARSE, ColumnSpec, PreprocessConfig
from tests.triton_fixtures import (  # noqa: F401
    TABLE_SIZE,
    TINY,
    onnx_outputs,
    processes_mentioning,
    tiny_inputs,
    tiny_onnx,
    tiny_onnx_file,
    triton_repo,
    triton_server,
)

ROOT = Path(__file__).resolve().parents[1]


def test_server_parses_the_written_config(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url.split("://")[1])
    try:
        config = client.get_model_config(TINY)
        metadata = client.get_model_metadata(TINY)
    finally:
        client.close()
    assert config["backend"] == "python" and config["max_batch_size"] == 1024
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("dense", "TYPE_FP32", [13]),
        ("sparse", "TYPE_INT64", [26]),
    ]
    assert [(t["name"], t["data_type"]) for t in config["output"]] == [("prob", "TYPE_FP32")]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert config["version_policy"] == {"latest": {"num_versions": 2}}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["model_warmup"][0]["batch_size"] == 2
    assert config["parameters"] == {"intra_op_threads": {"string_value": "1"}}
    assert [i["shape"] for i in metadata["inputs"]] == [[-1, 13], [-1, 26]]


def test_state_file_finds_the_server_and_blocks_a_second_one(triton_server, triton_repo):
    state = read_state(triton_repo.root)
    assert state.pid == triton_server.pid and state.http_url == triton_server.http_url
    found = TritonServer.from_state(triton_repo.root)
    status = found.status()
    assert status["ready"] and status["grpc_url"] == triton_server.grpc_url
    assert {"name": TINY, "version": "1", "state": "READY"} in status["models"]
    with pytest.raises(RecopsError, match="already runs"):
        TritonServer(ServerConfig(repo=triton_repo.root)).start()


def test_attach_controls_but_does_not_stop(triton_server):
    attached = TritonServer.attach(triton_server.http_url)
    assert attached.model_ready(TINY)
    with pytest.raises(RecopsError, match="attached, not started by recops"):
        attached.stop()
    with pytest.raises(ServingError, match="no ready Triton server"):
        TritonServer.attach(f"127.0.0.1:{free_port()}")
    with pytest.raises(ServingError, match="load 'nope'.*failed"):
        attached.load("nope")


def test_broken_model_load_reports_the_server_message(triton_server, triton_repo, tiny_onnx):
    triton_repo.add_version("broken", tiny_onnx)
    (triton_repo.root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ServingError, match="load 'broken'.*failed.*(?i:onnx|protobuf|load)"):
        triton_server.load("broken")
    assert triton_server.model_ready(TINY)


def test_hot_loaded_versions_and_per_request_selection(tmp_path, tmp_path_factory, tiny_onnx):
    second = tiny_onnx_file(tmp_path_factory, seed=1)
    repo = ModelRepository(tmp_path / "repo")
    repo.add_version("m", tiny_onnx, options=ServingOptions(dynamic_batching=None))
    inputs = tiny_inputs(8)
    with TritonServer(ServerConfig(repo=repo.root, load_models=("m",))) as server:
        stub = str(repo.root / "m" / "1" / "model.py")
        assert processes_mentioning(stub), "the python-backend stub should be running"
        with Predictor(server.http_url, "m") as predictor:
            assert predictor.predict(inputs).model_versions == ("1",)
            repo.add_version("m", second, options=ServingOptions(dynamic_batching=None))
            server.load("m")  # reload: the latest-1 policy now serves version 2 only
            new = predictor.predict(inputs)
            assert new.model_versions == ("2",)
            np.testing.assert_allclose(new.outputs["prob"], onnx_outputs(second, inputs)["prob"], rtol=1e-5)
            with pytest.raises(ServingError, match="version 1"):
                predictor.predict(inputs, model_version=1)

            repo.configure("m", options=ServingOptions(dynamic_batching=None, version_policy=VersionPolicy("all")))
            server.load("m")
            for version, onnx_path in ((1, tiny_onnx), (2, second)):
                got = predictor.predict_arrays(inputs, model_version=version)
                np.testing.assert_allclose(got, onnx_outputs(onnx_path, inputs)["prob"], rtol=1e-5)

            server.unload("m")
            assert not server.model_ready("m")
            with pytest.raises(ServingError, match="unknown model|not ready|unavailable"):
                predictor.predict(inputs)
    assert processes_mentioning(str(repo.root)) == [], "stop left a server or stub behind"
    assert not (repo.root / STATE_FILE).exists()


def test_failed_start_shows_the_log_and_leaves_nothing(tmp_path):
    repo = tmp_path / "empty-repo"
    with pytest.raises(RecopsError, match=r"(?s)exited with code.*missing"):
        TritonServer(ServerConfig(repo=repo, load_models=("missing",))).start()
    assert processes_mentioning(str(repo)) == []
    assert read_state(repo) is None


def _criteo_rows(path: Path, rows: int) -> None:
    rng = np.random.default_rng(3)
    lines = []
    for _ in range(rows):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(0, 50))) for _ in CRITEO_DENSE]
        cats = ["" if rng.random() < 0.2 else f"{int(rng.integers(0, 2**32)):08x}" for _ in CRITEO_SPARSE]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *dense, *cats]))
    path.write_text("\n".join(lines) + "\n")


def _recops(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "recops.cli", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_start_status_predict_stop(tmp_path, tiny_onnx):
    from recops.training.readers import read_frame

    preprocessor = Preprocessor(ColumnSpec.criteo(), PreprocessConfig(table_size=TABLE_SIZE))
    (tmp_path / "preprocess.json").write_text(json.dumps(preprocessor.to_dict()))
    repo = ModelRepository(tmp_path / "repo")
    repo.add_version("ctr", tiny_onnx, extra_files=[tmp_path / "preprocess.json"])
    _criteo_rows(tmp_path / "rows.tsv", 7)

    started = _recops("serve", "start", "--repo", str(repo.root), "--load", "ctr")
    try:
        assert started["http_url"].startswith("http://127.0.0.1:") and started["pid"] > 0
        status = _recops("serve", "status", "--repo", str(repo.root))
        assert status["running"] and status["ready"]
        assert {"name": "ctr", "version": "1", "state": "READY"} in status["models"]
        features = preprocessor.transform(read_frame(tmp_path / "rows.tsv"))
        expected = onnx_outputs(tiny_onnx, {"dense": features.dense, "sparse": features.sparse})
        for protocol in ("http", "grpc"):
            scored = _recops(
                "predict",
                "--name",
                "ctr",
                "--input",
                str(tmp_path / "rows.tsv"),
                "--repo",
                str(repo.root),
                "--protocol",
                protocol,
            )
            assert scored["rows"] == 7 and scored["versions"] == ["1"]
            np.testing.assert_allclose(scored["predictions"], expected["prob"][:, 0], rtol=1e-5)
    finally:
        stopped = _recops("serve", "stop", "--repo", str(repo.root))
    assert stopped["pid"] == started["pid"]
    assert processes_mentioning(str(repo.root)) == []
    assert _recops("serve", "status", "--repo", str(repo.root))["running"] is False


@pytest.mark.parametrize("taken", ["http", "grpc", "metrics"])
def test_serve_start_fails_when_a_port_belongs_to_another_server(taken, triton_server, tmp_path):
    """The port asked for is served by another Triton: start fails (exit 2, the server's message), reports no URL
    of the other server, and leaves no process and no state file."""
    url = {"http": triton_server.http_url, "grpc": triton_server.grpc_url, "metrics": triton_server.metrics_url}
    port = url[taken].split("://", 1)[1].split("/")[0].rsplit(":", 1)[1]
    repo = tmp_path / "repo"
    done = subprocess.run(
        [sys.executable, "-m", "recops.cli", "serve", "start", "--repo", str(repo), f"--{taken}-port", port, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout
    assert f"port {port}" in done.stderr and "in use" in done.stderr, done.stderr
    assert processes_mentioning(str(repo)) == [] and read_state(repo) is None
    assert triton_server.is_ready()


def test_serve_stop_without_a_server_is_a_clean_no_op(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / STATE_FILE).write_text(json.dumps(_dead_state(repo)))
    stopped = _recops("serve", "stop", "--repo", str(repo))
    assert stopped["stopped"] is False and "nothing was running" in stopped["message"]
    assert not (repo / STATE_FILE).exists(), "the stale state file of a dead server is removed"
    assert _recops("serve", "stop", "--repo", str(tmp_path / "never-used"))["stopped"] is False


def _dead_state(repo: Path) -> dict:
    """The state file of a server whose process is gone (a pid that no longer runs)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    url = f"http://127.0.0.1:{free_port()}"
    return {"pid": pid, "http_url": url, "grpc_url": url, "metrics_url": url, "repo": str(repo), "log_file": ""}


def test_a_server_dies_with_the_process_that_started_it(tmp_path, tiny_onnx):
    """A server started by a process that is not a daemon (`TritonServer(...).start()`) and its python-backend stubs
    do not outlive that process when it is SIGKILLed (no chance to stop them)."""
    repo = ModelRepository(tmp_path / "repo")
    repo.add_version("m", tiny_onnx)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from recops.serving.server import ServerConfig, TritonServer; "
            f"s = TritonServer(ServerConfig(repo={str(repo.root)!r}, load_models=('m',))).start(); "
            "print(s.pid, flush=True); time.sleep(300)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(launcher.stdout.readline())
        assert len(triton_processes(pid)) == 2, "the server and the model's stub run"
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 20
    while triton_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert triton_processes(pid) == [] and processes_mentioning(str(repo.root)) == []


@pytest.mark.parametrize(
    "command",
    [
        ("deploy", "--name", "{bad}", "--version", "1", "--url", "{url}"),
        ("deploy", "--name", "{bad}", "--status"),
        ("serve", "load", "{bad}", "--url", "{url}"),
        ("serve", "start", "--load", "{bad}"),
        ("predict", "--name", "{bad}", "--input", "{rows}", "--preprocess", "{rows}", "--url", "{url}"),
    ],
)
def test_bad_model_names_are_refused_before_any_work(command, triton_server, tmp_path):
    (tmp_path / "rows.tsv").write_text("")
    values = {"bad": "../escape", "url": triton_server.http_url, "rows": str(tmp_path / "rows.tsv")}
    args = [part.format(**values) for part in command]
    done = subprocess.run(
        [sys.executable, "-m", "recops.cli", *args, "--repo", str(tmp_path / "repo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "model name '../escape' is invalid" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "repo").exists()


def test_predict_a_version_the_repository_lacks_is_a_clear_error(triton_server, triton_repo, tmp_path):
    _criteo_rows(tmp_path / "rows.tsv", 3)
    common = ["--name", TINY, "--input", str(tmp_path / "rows.tsv"), "--url", triton_server.http_url]
    preprocessor = Preprocessor(ColumnSpec.criteo(), PreprocessConfig(table_size=TABLE_SIZE))
    (tmp_path / "preprocess.json").write_text(json.dumps(preprocessor.to_dict()))
    for source in (["--repo", str(triton_repo.root)], ["--preprocess", str(tmp_path / "preprocess.json")]):
        done = subprocess.run(
            [sys.executable, "-m", "recops.cli", "predict", *common, "--version", "99", *source],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"model '{TINY}' has no version 99" in done.stderr, done.stderr
