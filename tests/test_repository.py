"""Model repository writer: layout, atomic versions, config text, name validation (no server needed)."""

from __future__ import annotations

import filecmp
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from recops.errors import RecopsError
from recops.serving.repository import (
    DynamicBatching,
    GpuOptimization,
    ModelRepository,
    ServingOptions,
    VersionPolicy,
    WarmupRequest,
    external_data_files,
)
from tests.triton_fixtures import TINY_OPTIONS, onnx_outputs, parsed, tiny_inputs, tiny_onnx  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "serving" / "triton_python_model.py"


def fixed_shape_onnx(path: Path) -> Path:
    """An Identity model with a fixed [2, 3] input: no batch dim."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "fixed", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def hidden_entries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_cpu_version_copies_model_data_and_template(tmp_path, tiny_onnx):
    repo = ModelRepository(tmp_path / "repo")
    data_files = external_data_files(tiny_onnx)
    assert data_files, "the dynamo exporter should write external data; the copy test needs it"

    assert repo.add_version("tiny", tiny_onnx, options=TINY_OPTIONS) == 1

    version_dir = tmp_path / "repo" / "tiny" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(["model.onnx", "model.py", *data_files])
    assert filecmp.cmp(version_dir / "model.py", TEMPLATE, shallow=False)
    inputs = tiny_inputs(5)
    np.testing.assert_array_equal(
        onnx_outputs(version_dir / "model.onnx", inputs)["prob"], onnx_outputs(tiny_onnx, inputs)["prob"]
    )
    text = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    for line in (
        'name: "tiny"',
        'backend: "python"',
        "max_batch_size: 1024",
        "KIND_CPU",
        '{ name: "dense" data_type: TYPE_FP32 dims: [ 13 ] }',
        '{ name: "sparse" data_type: TYPE_INT64 dims: [ 26 ] }',
        '{ name: "prob" data_type: TYPE_FP32 dims: [ 1 ] }',
        'key: "intra_op_threads" value: { string_value: "1" }',
    ):
        assert line in text
    assert "platform" not in text
    assert repo.models() == ["tiny"]
    assert hidden_entries(tmp_path / "repo" / "tiny") == []


def test_versions_are_numbered_listed_and_removed(tmp_path, tiny_onnx):
    repo = ModelRepository(tmp_path)
    assert [repo.add_version("m", tiny_onnx) for _ in range(2)] == [1, 2]
    assert repo.add_version("m", tiny_onnx, version=5) == 5
    with pytest.raises(RecopsError, match="version 2 is invalid or exists"):
        repo.add_version("m", tiny_onnx, version=2)
    repo.remove_version("m", 1)
    assert repo.versions("m") == [2, 5]
    with pytest.raises(RecopsError, match="has no version 7"):
        repo.remove_version("m", 7)
    assert repo.add_version("m", tiny_onnx) == 6
    assert hidden_entries(tmp_path / "m") == []


@pytest.mark.parametrize(
    "target, kind, threads", [("cpu-ort", "KIND_CPU", "intra_op_thread_count"), ("gpu", "KIND_GPU", None)]
)
def test_onnxruntime_backend_targets(tmp_path, tiny_onnx, target, kind, threads):
    """cpu-ort and gpu: Triton's onnxruntime backend (not servable here: the local server has no such backend)."""
    repo = ModelRepository(tmp_path)
    repo.add_version("m", tiny_onnx, target=target, options=ServingOptions(instance_count=2, intra_op_threads=3))
    config = parsed(tmp_path / "m" / "config.pbtxt")
    assert config["platform"] == "onnxruntime_onnx" and "backend" not in config
    assert config["instance_group"] == [{"count": 2, "kind": kind}]
    assert config.get("parameters", {}) == ({threads: {"string_value": "3"}} if threads else {})
    assert "optimization" not in config
    assert sorted(p.name for p in (tmp_path / "m" / "1").iterdir()) == sorted(
        ["model.onnx", *external_data_files(tiny_onnx)]
    )


def test_gpu_target_tensorrt_and_cuda_graphs_block(tmp_path, tiny_onnx):
    repo = ModelRepository(tmp_path)
    options = ServingOptions(gpu=GpuOptimization("FP16", cuda_graphs=True))
    repo.add_version("m", tiny_onnx, target="gpu", options=options)
    tensorrt = {"name": "tensorrt", "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}}
    graphs = {"parameters": {**tensorrt["parameters"], "trt_cuda_graph_enable": "1"}}
    assert parsed(tmp_path / "m" / "config.pbtxt")["optimization"] == {
        "execution_accelerators": {"gpu_execution_accelerator": [{**tensorrt, **graphs}]}
    }
    assert repo.settings("m") == ("gpu", options)  # later versions keep it

    repo.configure("m", options=replace(options, gpu=GpuOptimization("FP32")))
    accelerator = parsed(tmp_path / "m" / "config.pbtxt")["optimization"]["execution_accelerators"]
    assert accelerator["gpu_execution_accelerator"][0]["parameters"] == {
        **tensorrt["parameters"],
        "precision_mode": "FP32",
    }

    with pytest.raises(RecopsError, match="CUDA graphs need the TensorRT execution provider"):
        GpuOptimization(cuda_graphs=True)
    with pytest.raises(RecopsError, match="TensorRT precision 'INT8'"):
        GpuOptimization("INT8")
    with pytest.raises(RecopsError, match="gpu-target options; target 'cpu-ort' cannot use them"):
        repo.add_version("c", tiny_onnx, target="cpu-ort", options=options)
    assert repo.versions("c") == []


def test_settings_written_before_the_gpu_and_raw_options_still_load(tmp_path, tiny_onnx):
    repo = ModelRepository(tmp_path)
    repo.add_version("m", tiny_onnx)
    settings = tmp_path / "m" / "recops-serving.json"
    data = json.loads(settings.read_text())
    del data["options"]["gpu"], data["options"]["raw_dense"]
    settings.write_text(json.dumps(data))
    assert repo.settings("m") == ("cpu", ServingOptions())


def test_serving_options_are_written(tmp_path, tiny_onnx):
    options = ServingOptions(
        max_batch_size=32,
        dynamic_batching=DynamicBatching((8, 16), 500),
        instance_count=2,
        version_policy=VersionPolicy("specific", versions=(1, 3)),
        warmup=(WarmupRequest(batch_size=4, data="random", count=2),),
    )
    repo = ModelRepository(tmp_path)
    repo.add_version("m", tiny_onnx, options=options)
    text = (tmp_path / "m" / "config.pbtxt").read_text()
    assert "dynamic_batching { preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 500 }" in text
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in text
    assert "version_policy: { specific: { versions: [1, 3] } }" in text
    assert 'name: "warmup_0" batch_size: 4 count: 2' in text
    assert 'inputs { key: "sparse" value: { data_type: TYPE_INT64 dims: [ 26 ] random_data: true } }' in text
    assert repo.settings("m") == ("cpu", options)

    repo.configure("m", options=ServingOptions(dynamic_batching=None, version_policy=VersionPolicy("all")))
    text = (tmp_path / "m" / "config.pbtxt").read_text()
    assert "version_policy: { all: {} }" in text and "dynamic_batching" not in text
    with pytest.raises(RecopsError, match="non-empty versions list"):
        repo.configure("m", options=ServingOptions(version_policy=VersionPolicy("specific")))
    with pytest.raises(RecopsError, match="warm-up data 'ones'"):
        repo.configure("m", options=ServingOptions(warmup=(WarmupRequest(data="ones"),)))


def test_model_without_batch_dim_needs_max_batch_size_zero(tmp_path):
    onnx_path = fixed_shape_onnx(tmp_path / "fixed.onnx")
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(RecopsError, match="dynamic first .batch. dim"):
        repo.add_version("fixed", onnx_path)
    assert repo.versions("fixed") == []
    repo.add_version("fixed", onnx_path, options=ServingOptions(max_batch_size=0, dynamic_batching=None))
    text = (tmp_path / "repo" / "fixed" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in text and '{ name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] }' in text


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "..", "-x", "a b", "x;y", "m\n"])
def test_invalid_model_names_are_rejected(tmp_path, name):
    onnx_path = fixed_shape_onnx(tmp_path / "fixed.onnx")
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(RecopsError, match="model name .* is invalid"):
        repo.add_version(name, onnx_path, options=ServingOptions(max_batch_size=0))
    with pytest.raises(RecopsError, match="model name"):
        repo.versions(name)
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "repo").exists() or list((tmp_path / "repo").iterdir()) == []


def test_missing_inputs_leave_nothing_behind(tmp_path, tiny_onnx):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(tiny_onnx, lonely / "model.onnx")  # without its external data
    repo = ModelRepository(tmp_path / "repo")
    with pytest.raises(RecopsError, match="external data must lie next to it"):
        repo.add_version("m", lonely / "model.onnx")
    assert repo.versions("m") == [] and hidden_entries(tmp_path / "repo" / "m") == []
    with pytest.raises(RecopsError, match="does not exist"):
        repo.add_version("m", tmp_path / "nope.onnx")
    with pytest.raises(RecopsError, match="target 'tpu' is unknown"):
        repo.add_version("m", tiny_onnx, target="tpu")


def test_extra_files_are_copied_into_the_version(tmp_path, tiny_onnx):
    extra = tmp_path / "preprocess.json"
    extra.write_text("{}")
    repo = ModelRepository(tmp_path / "repo")
    version = repo.add_version("m", tiny_onnx, extra_files=[extra])
    assert (tmp_path / "repo" / "m" / str(version) / "preprocess.json").read_text() == "{}"


def test_later_versions_keep_the_model_settings(tmp_path, tiny_onnx):
    repo = ModelRepository(tmp_path)
    options = ServingOptions(max_batch_size=16, version_policy=VersionPolicy("all"))
    repo.add_version("m", tiny_onnx, target="gpu", options=options)
    first = (tmp_path / "m" / "config.pbtxt").read_text()
    repo.add_version("m", tiny_onnx)
    assert (tmp_path / "m" / "config.pbtxt").read_text() == first
    assert repo.settings("m") == ("gpu", options)
    assert repo.settings("new_model") == ("cpu", ServingOptions())


def test_a_version_cut_short_by_a_kill_is_collected_by_the_next_write(tmp_path, tiny_onnx):
    """A writer SIGKILLed just before it renames its assembled version into place (an audit hook on os.rename
    delivers the kill) leaves a staging directory; the next add_version removes it, and the half-made version was
    never a version."""
    repo = ModelRepository(tmp_path / "repo")
    repo.add_version("m", tiny_onnx)
    script = (
        "import os, signal, sys; from recops.serving.repository import ModelRepository; "
        "sys.addaudithook(lambda event, args: event == 'os.rename' and os.kill(os.getpid(), signal.SIGKILL)); "
        f"ModelRepository({str(repo.root)!r}).add_version('m', {str(tiny_onnx)!r})"
    )
    died = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert hidden_entries(repo.model_dir("m")) != [] and repo.versions("m") == [1]
    assert repo.add_version("m", tiny_onnx) == 2
    assert hidden_entries(repo.model_dir("m")) == [], "the dead writer's staging directory is collected"
