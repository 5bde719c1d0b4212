"""ONNX export of real TorchRec checkpoints: parity gate (random inputs + val split), broken exports refused
with the repository untouched, multi-hot inputs, external data, FP16, and the `recops export` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from recops.errors import RecopsError
from recops.ops.publish import register_checkpoint
from recops.serving.export import ExportConfig, ParityError, check_parity, export_onnx, export_to_repository, publish
from recops.serving.inference_module import load_torchrec, torchrec_probabilities
from recops.serving.onnx_model import OUTPUT_NAME, PREPROCESS_FILE, ExportRecord, onnx_probabilities, onnx_session
from recops.serving.repository import ModelRepository
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import Dataset
from tests.model_fixtures import multi_hot_checkpoint, trained_checkpoint
from tests.triton_fixtures import parsed


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the sha256 of its content."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    return {family: trained_checkpoint(tiny_dataset.path, family, tmp_path_factory) for family in ("dlrm", "dcn")}


@pytest.mark.parametrize("family", ["dlrm", "dcn"])
def test_parity_on_random_inputs_and_the_val_split(family, checkpoints, tiny_dataset, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    result = export_to_repository(checkpoints[family], repo, family, dataset=tiny_dataset.path)
    report = result.parity
    assert result.version == 1 and result.onnx_path == tmp_path / "repo" / family / "1" / "model.onnx"
    assert result.record.exporter == "dynamo"
    assert report.passed and report.max_abs_diff <= 1e-5 and report.random_max_abs_diff <= 1e-5
    assert report.rows_random == 4096 and report.rows_eval == len(tiny_dataset.split("val").label)
    assert 1800 < report.rows_eval < 2200  # the whole val split: 10% of 20k rows, each by its own hash
    assert round(report.auc_torch, 4) == round(report.auc_onnx, 4)
    assert report.auc_torch > 0.5

    graph = onnx.load(str(result.onnx_path)).graph
    ops = {node.op_type for node in graph.node}
    assert "Gather" in ops and not ops & {"Loop", "Scan", "If"}
    assert [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input] == [
        ("dense", ["batch", 13]),
        ("sparse", ["batch", 26]),
    ]
    assert [o.name for o in graph.output] == [OUTPUT_NAME]

    version_dir = result.onnx_path.parent
    ckpt = Checkpoint.open(checkpoints[family])
    assert json.loads((version_dir / PREPROCESS_FILE).read_text()) == ckpt.meta.preprocessor
    record = ExportRecord.read(version_dir)
    assert record.parity["max_abs_diff"] == report.max_abs_diff and record.layout.tables == ckpt.meta.model.tables
    lineage = record.lineage  # which model this version is, trained on what, served as what
    assert (lineage.fingerprint, lineage.dataset, lineage.registry_version) == (
        ckpt.fingerprint,
        ckpt.meta.dataset,
        None,
    )
    assert (lineage.model, lineage.version, lineage.repository) == (family, 1, str(repo.root.resolve()))

    # the served preprocessing + ONNX on held-out rows equals the TorchRec model on the same rows
    test = Dataset.open(tiny_dataset.path).split("test")
    inputs = {"dense": np.asarray(test.dense[:1]), "sparse": np.asarray(test.sparse[:1])}  # batch of one
    expected = torchrec_probabilities(load_torchrec(ckpt), record.layout, inputs)
    got = onnx_probabilities(onnx_session(result.onnx_path), inputs)
    assert got.shape == (1, 1) and np.abs(got - expected).max() <= 1e-5

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # CPU hosts: CUDA falls back, warned
        with pytest.warns(RuntimeWarning, match="no CUDAExecutionProvider .*onnxruntime-gpu.*running on CPU"):
            session = onnx_session(result.onnx_path, device="cuda")
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert np.array_equal(onnx_probabilities(session, inputs), got)
    with pytest.raises(RecopsError, match="device 'gpu0': use auto, cpu or cuda"):
        onnx_session(result.onnx_path, device="gpu0")


def test_multi_hot_features_are_padded_inputs_with_masks(tmp_path_factory, tmp_path):
    data, ckpt = multi_hot_checkpoint(tmp_path_factory)
    result = export_to_repository(ckpt, tmp_path / "repo", "mh", dataset=data)
    assert [(s.name, s.dtype, s.dims) for s in result.record.inputs] == [
        ("dense", "FP32", (-1, 1)),
        ("sparse", "INT64", (-1, 1)),
        ("multi_tags", "INT64", (-1, 3)),
        ("mask_tags", "FP32", (-1, 3)),
    ]
    assert result.parity.max_abs_diff <= 1e-5 and result.parity.rows_eval > 0 and result.record.exporter == "dynamo"
    assert round(result.parity.auc_torch, 4) == round(result.parity.auc_onnx, 4)
    assert result.parity.auc_torch > 0.6  # the tags carry the label: the multi-hot path is really used


def test_perturbed_weight_fails_the_gate_and_leaves_the_repository_untouched(checkpoints, tiny_dataset, tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    exported = export_onnx(checkpoints["dlrm"], tmp_path / "export")
    good = publish(exported, repo, "m", dataset=tiny_dataset.path)
    before = tree_digest(repo.root)

    model = onnx.load(str(exported.onnx_path))
    bias = max(
        (t for t in model.graph.initializer if t.name.startswith("head.over_arch") and "bias" in t.name),
        key=lambda t: int(t.name.split(".")[2]),
    )
    values = onnx.numpy_helper.to_array(bias).copy()
    values += 1e-3  # one logit shift: every probability moves by ~1e-4
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(exported.onnx_path))

    with pytest.raises(ParityError, match=r"max \|onnx - torchrec\|") as failure:
        publish(exported, repo, "m", dataset=tiny_dataset.path)
    report = failure.value.report
    assert not report.passed and 1e-5 < report.max_abs_diff < 1e-3 and report.where.startswith(("random", "val"))
    assert "nothing was written" in str(failure.value)
    assert tree_digest(repo.root) == before and repo.versions("m") == [good.version]


def test_external_data_round_trips_into_the_repository(checkpoints, tiny_dataset, tmp_path):
    exported = export_onnx(checkpoints["dcn"], tmp_path / "export", ExportConfig(external_data=True))
    data_file = exported.onnx_path.with_name("model.onnx.data")
    assert exported.record.external_data and data_file.stat().st_size > 26 * 1000 * 16 * 4
    assert exported.onnx_path.stat().st_size < 100_000  # the graph only
    report = check_parity(exported, tiny_dataset.path)
    assert report.max_abs_diff <= 1e-5

    repo = ModelRepository(tmp_path / "repo")
    result = publish(exported, repo, "ext")
    served = result.onnx_path.parent
    assert (served / "model.onnx.data").read_bytes() == data_file.read_bytes()
    inputs = exported.layout.random_inputs(257, np.random.default_rng(5))
    assert np.array_equal(
        onnx_probabilities(onnx_session(result.onnx_path), inputs),
        onnx_probabilities(onnx_session(exported.onnx_path), inputs),
    )


def test_fp16_export_keeps_float32_io_within_its_tolerance(checkpoints, tiny_dataset, tmp_path):
    exported = export_onnx(checkpoints["dlrm"], tmp_path / "fp16", ExportConfig(fp16=True))
    model = onnx.load(str(exported.onnx_path))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    report = check_parity(exported, tiny_dataset.path)
    assert report.tolerance == 1e-2 and report.max_abs_diff <= 1e-2
    assert report.max_abs_diff > 0  # really computed in half precision


def test_export_command_from_a_registered_version(checkpoints, tiny_dataset, tmp_path, capsys):
    """`recops export` through the CLI framework, in this process (torch is already imported here)."""
    from recops.cli import main
    from recops.ops.registry import LocalRegistry

    registry = LocalRegistry(tmp_path / "registry")
    registered = register_checkpoint(registry, Checkpoint.open(checkpoints["dcn"]))
    registry.set_alias(registered.version, "candidate")
    common = ["--name", "ctr", "--repo", str(tmp_path / "repo"), "--registry", str(tmp_path / "registry"), "--json"]
    assert main(["export", "--model-version", "candidate", "--data", str(tiny_dataset.path), *common]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["name"] == "ctr" and out["version"] == 1 and Path(out["onnx_path"]).is_file()
    assert out["parity_max_abs_diff"] <= 1e-5
    assert round(out["parity_auc"]["torch"], 4) == round(out["parity_auc"]["onnx"], 4)
    assert out["inputs"] == [
        {"name": "dense", "dtype": "FP32", "dims": [-1, 13]},
        {"name": "sparse", "dtype": "INT64", "dims": [-1, 26]},
    ]
    assert out["model_version"] == registered.version == out["lineage"]["registry_version"]
    assert registry.get(registered.version).served[0] | {"time": 0} == {
        "repository": str((tmp_path / "repo").resolve()),
        "model": "ctr",
        "version": 1,
        "status": "exported",
        "time": 0,
    }

    assert main(["export", "--checkpoint", str(tmp_path / "nope"), *common]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), *common[:1], "x" * 300, *common[2:]]) == 2
    assert "model name 'xxxxx" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "repo").iterdir() if "xxx" in p.name] == [], "checked before any work"
    repo = ModelRepository(tmp_path / "repo")
    assert (
        repo.versions("ctr") == [1]
        and "count: 1 kind: KIND_CPU" in (repo.model_dir("ctr") / "config.pbtxt").read_text()
    )

    # serving settings: --instances/--threads change only what they name and stick for later versions
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), "--instances", "2", "--threads", "3", *common]) == 0
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), *common]) == 0
    config = (repo.model_dir("ctr") / "config.pbtxt").read_text()
    assert repo.versions("ctr") == [1, 2, 3] and "count: 2 kind: KIND_CPU" in config
    assert 'key: "intra_op_threads" value: { string_value: "3" }' in config
    assert repo.settings("ctr")[1].max_batch_size == 4096  # the rest of the stored settings kept
    # a checkpoint exported directly is the same registered model (found by its fingerprint), not a new one
    assert [v.version for v in registry.list()] == [registered.version]
    assert {(e["version"], e["status"]) for e in registry.get(registered.version).served} == {
        (1, "exported"),
        (2, "exported"),
        (3, "exported"),
    }
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), "--instances", "0", *common]) == 2
    assert "--instances and --threads must be >= 1" in capsys.readouterr().err

    # targets and their options (configs only: the local server has no onnxruntime backend)
    gpu = ["--target", "gpu", "--tensorrt", "fp16", "--cuda-graphs", "--raw-dense", "bytes"]
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), *gpu, *common]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["raw_model"] == "ctr_raw" and out["version"] == 4
    config = parsed(repo.model_dir("ctr") / "config.pbtxt")
    assert config["platform"] == "onnxruntime_onnx" and config["instance_group"][0]["kind"] == "KIND_GPU"
    tensorrt = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert tensorrt["parameters"]["precision_mode"] == "FP16" and tensorrt["parameters"]["trt_cuda_graph_enable"] == "1"
    assert {t["data_type"] for t in parsed(repo.model_dir("ctr_raw") / "config.pbtxt")["input"]} == {"TYPE_STRING"}
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), "--tensorrt", "off", "--cuda-graphs", *common]) == 2
    assert "CUDA graphs need the TensorRT execution provider" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoints["dcn"]), "--target", "cpu-ort", *common]) == 2
    assert "target 'cpu-ort' cannot use them (--tensorrt off)" in capsys.readouterr().err
    assert repo.versions("ctr") == [1, 2, 3, 4]
