"""The raw-feature model without a server: what the repository writer puts down (parsed with Triton's own config
schema), raw tensors <-> the Preprocessor's frame with errors naming the column, and the preprocessing step's choice
of version (the deployment record's split, the same rule as the client Router) and its merged transforms."""

from __future__ import annotations

import filecmp
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.serving.deploy import DeployState, in_canary, state_path
from recops.serving.onnx_model import PREPROCESS_FILE, ExportRecord, FeatureLayout, ModelLineage
from recops.serving.raw_features import RawInputError, random_raw_frame, raw_columns, raw_frame, raw_inputs
from recops.serving.raw_model import PreprocessStep, RawRequest, check_compatible, shared_code, write_raw_model
from recops.serving.repository import ModelRepository
from recops.training.dataset import DatasetRef
from recops.training.preprocess import Preprocessor
from recops.training.spec import CRITEO_SPARSE, ColumnSpec, PreprocessConfig
from tests.triton_fixtures import TABLE_SIZE, TINY_OPTIONS, parsed, tiny_onnx  # noqa: F401 (fixture)

CRITEO = Preprocessor(ColumnSpec.criteo(), PreprocessConfig(table_size=TABLE_SIZE))
MULTI = Preprocessor(
    ColumnSpec(dense=("x",), sparse=("user",), multi_hot={"tags": 3}, format="csv"), PreprocessConfig(table_size=50)
)
NO_DENSE = Preprocessor(ColumnSpec(dense=(), sparse=("user", "item"), format="csv"), PreprocessConfig(table_size=50))


def export_dir(path: Path, onnx_file: Path, preprocessor: Preprocessor = CRITEO) -> Path:
    """An export-like directory: the tiny model with a preprocessor and the export record of its layout."""
    path.mkdir(parents=True)
    (path / "model.onnx").symlink_to(onnx_file)
    for data in onnx_file.parent.glob("*.data"):
        (path / data.name).symlink_to(data)
    write_json_atomic(path / PREPROCESS_FILE, preprocessor.to_dict())
    layout = FeatureLayout(13, dict.fromkeys(CRITEO_SPARSE, TABLE_SIZE), CRITEO_SPARSE, {})
    ExportRecord(layout, "dynamo", False, False, ModelLineage("ckpt", "f" * 64, DatasetRef(path, "v"))).write(path)
    return path


@pytest.fixture
def repo(tmp_path, tiny_onnx) -> ModelRepository:
    """Tensor-level model ``ctr`` with versions 1 and 2 (the tiny model and the Criteo preprocessor)."""
    repo = ModelRepository(tmp_path / "repo")
    source = export_dir(tmp_path / "export", tiny_onnx)
    for _ in range(2):
        repo.add_version("ctr", source / "model.onnx", options=TINY_OPTIONS, extra_files=list(source.glob("*.json")))
    write_raw_model(repo, "ctr", 2)
    return repo


def test_the_raw_model_is_an_ensemble_of_two_python_steps(repo):
    assert repo.models() == ["ctr", "ctr_raw", "ctr_raw_preprocess", "ctr_raw_score"]
    ensemble = parsed(repo.model_dir("ctr_raw") / "config.pbtxt")
    assert ensemble["platform"] == "ensemble" and ensemble["max_batch_size"] == TINY_OPTIONS.max_batch_size
    assert [(t["name"], t["data_type"], t["dims"]) for t in ensemble["input"]] == [
        *((f"I{i}", "TYPE_FP32", ["1"]) for i in range(1, 14)),
        *((f"C{i}", "TYPE_STRING", ["1"]) for i in range(1, 27)),
    ]
    assert [(t["name"], t["data_type"]) for t in ensemble["output"]] == [
        ("prob", "TYPE_FP32"),
        ("model_version", "TYPE_INT64"),
    ]
    assert sorted(p.name for p in repo.model_dir("ctr_raw").iterdir()) == ["1", "config.pbtxt"]
    assert list((repo.model_dir("ctr_raw") / "1").iterdir()) == []

    first, second = ensemble["ensemble_scheduling"]["step"]
    assert (first["model_name"], first["model_version"], second["model_name"]) == (
        "ctr_raw_preprocess",
        "-1",
        "ctr_raw_score",
    )
    assert first["input_map"] == {f"{c}": f"{c}" for c in (*(f"I{i}" for i in range(1, 14)), *CRITEO_SPARSE)}
    tensors = {"dense": "dense", "sparse": "sparse", "model_version": "model_version"}
    assert first["output_map"] == tensors == second["input_map"] and second["output_map"] == {"prob": "prob"}

    for step, code in (("ctr_raw_preprocess", "raw_preprocess.py"), ("ctr_raw_score", "raw_score.py")):
        config = parsed(repo.model_dir(step) / "config.pbtxt")
        assert config["backend"] == "python" and config["parameters"] == {"model": {"string_value": "ctr"}}
        assert "model_warmup" not in config and "dynamic_batching" in config
        assert filecmp.cmp(repo.model_dir(step) / "1" / "model.py", shared_code(code), shallow=False)
        assert shared_code(code).parent.name == "triton_models"
    score = parsed(repo.model_dir("ctr_raw_score") / "config.pbtxt")
    assert [t["name"] for t in score["input"]] == ["dense", "sparse", "model_version"]


def test_rewriting_is_a_no_op_and_the_dense_datatype_is_a_model_setting(repo):
    files = [p for p in repo.root.rglob("*") if p.is_file() and "_raw" in str(p)]
    stamps = {p: os.stat(p).st_mtime_ns for p in files}
    write_raw_model(repo, "ctr", 2)
    assert {p: os.stat(p).st_mtime_ns for p in files} == stamps  # Triton sees nothing to reload

    repo.configure("ctr", options=replace(TINY_OPTIONS, raw_dense="BYTES"))
    write_raw_model(repo, "ctr", 2)
    inputs = parsed(repo.model_dir("ctr_raw") / "config.pbtxt")["input"]
    assert {t["data_type"] for t in inputs} == {"TYPE_STRING"}
    with pytest.raises(RecopsError, match="raw dense datatype 'INT64'"):
        replace(TINY_OPTIONS, raw_dense="INT64")


def test_names_that_would_collide_are_refused(repo, tiny_onnx):
    repo.add_version("other_raw", tiny_onnx)  # a tensor-level model of its own
    with pytest.raises(RecopsError, match="'other_raw' is a model of its own"):
        write_raw_model(repo, "other", 1)
    with pytest.raises(RecopsError, match="'ctr_raw_score' is a model written by recops around another model"):
        write_raw_model(repo, "ctr_raw_score", 1)
    with pytest.raises(RecopsError, match="too long for its raw-feature model"):
        write_raw_model(repo, "m" * 190, 1)


def test_an_export_with_other_columns_is_refused(repo, tmp_path, tiny_onnx):
    check_compatible(repo, "ctr", repo.model_dir("ctr") / "1")
    with pytest.raises(RecopsError, match="other raw columns than version 2 of 'ctr'.*new model name"):
        check_compatible(repo, "ctr", export_dir(tmp_path / "multi", tiny_onnx, MULTI))


# ---- raw tensors <-> frame ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preprocessor", [CRITEO, MULTI, NO_DENSE], ids=["criteo", "multi-hot", "no-dense"])
@pytest.mark.parametrize("dense", ["FP32", "BYTES"])
def test_raw_tensors_preprocess_like_the_frame_they_came_from(preprocessor, dense):
    """Missing values (NaN, empty), multi-hot lists and numbers survive the trip through request tensors."""
    frame = random_raw_frame(preprocessor.spec, 300, np.random.default_rng(0), missing=0.3)
    assert (frame == "").any().any() and (frame.isna().any().any() or not preprocessor.spec.dense)
    tensors = raw_inputs(frame, raw_columns(preprocessor.spec, dense), preprocessor.spec.separator)
    assert all(t.shape == (300, 1) for t in tensors.values())
    expected, got = preprocessor.transform(frame), preprocessor.transform(raw_frame(preprocessor.spec, tensors))
    np.testing.assert_array_equal(got.sparse, expected.sparse)
    np.testing.assert_allclose(got.dense, expected.dense, rtol=1e-7)
    for name in preprocessor.spec.multi_hot:
        np.testing.assert_array_equal(got.multi[name], expected.multi[name])
        assert (got.multi[name] >= 1).any() and (got.multi[name][:, 0] == 0).any()  # tokens and empty rows


def _tensors(frame, dense="BYTES"):
    return raw_inputs(frame, raw_columns(MULTI.spec, dense))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("tags"), r"columns tags are missing: send one input per column \(x, user, tags\)"),
        (
            lambda t: t.update(x=np.array([[b"1"], [b"abc"]], object)),
            r"column x: 'abc' \(row 1\) is not a number; send",
        ),
        (lambda t: t.update(user=np.array([[b"ok"], [b"\xff"]], object)), "column user: row 1 is not UTF-8 text"),
        (lambda t: t.update(user=np.array([[1], [2]])), "column user is int64: send it as BYTES"),
        (lambda t: t.update(x=np.array([[b"1"]], object)), "different row counts"),
    ],
    ids=["missing column", "unparsable number", "not utf-8", "wrong type", "ragged"],
)
def test_bad_requests_name_the_column_and_the_fix(change, message):
    tensors = _tensors(random_raw_frame(MULTI.spec, 2, np.random.default_rng(1), missing=0.0))
    change(tensors)
    with pytest.raises(RawInputError, match=message):
        raw_frame(MULTI.spec, tensors)


# ---- the preprocessing step ---------------------------------------------------------------------------------------
def _request(rows: int, seed: int = 0, **parameters) -> RawRequest:
    frame = random_raw_frame(CRITEO.spec, rows, np.random.default_rng(seed))
    return RawRequest(raw_inputs(frame, raw_columns(CRITEO.spec, "FP32")), parameters)


def _step(repo: ModelRepository) -> PreprocessStep:
    return PreprocessStep(
        repo, "ctr", {"dense": np.dtype(np.float32), "sparse": np.dtype(np.int64), "model_version": np.dtype(np.int64)}
    )


def test_the_step_follows_the_parameter_then_the_record_then_the_newest_version(repo):
    step = _step(repo)
    assert step.version(_request(1)) == 2  # no deployment record: the newest version
    assert step.version(_request(1, version="1")) == step.version(_request(1, version=1)) == 1
    for bad in ("9", "one", 0):
        with pytest.raises(RawInputError, match=r"request parameter version=.*has versions \[1, 2\]; ask for one"):
            step.version(_request(1, version=bad))

    write_json_atomic(state_path(repo, "ctr"), DeployState(production=1, canary=2, canary_share=0.3).to_dict())
    keys = [f"user-{i}" for i in range(300)]
    chosen = [step.version(_request(1, key=k)) for k in keys]
    assert chosen == [2 if in_canary(k, 0.3) else 1 for k in keys] and set(chosen) == {1, 2}
    by_id = RawRequest(_request(1).tensors, {}, request_id=keys[0])
    assert step.version(by_id) == chosen[0]  # the request id is the key when no key is given

    write_json_atomic(state_path(repo, "ctr"), DeployState(production=2).to_dict())
    assert {step.version(_request(1, key=k)) for k in keys} == {2}  # the record is re-read when it changes


def test_merged_requests_equal_single_ones_and_a_bad_request_fails_alone(repo):
    step = _step(repo)
    good = [_request(rows, seed, version=version) for rows, seed, version in ((3, 1, 1), (1, 2, 2), (5, 3, 1))]
    bad = RawRequest({**good[0].tensors, "I1": np.array([[b"x"]] * 3, object)}, {"version": 1})
    results = step.run([good[0], bad, good[1], good[2]])
    assert isinstance(results[1], RawInputError) and "column I1" in str(results[1])
    for request, result in zip(good, (results[0], results[2], results[3])):
        alone = step.run([request])[0]
        assert set(result) == {"dense", "sparse", "model_version"} and result["dense"].dtype == np.float32
        for name in result:
            np.testing.assert_array_equal(result[name], alone[name])
        assert (result["model_version"] == int(request.parameters["version"])).all()
        frame = raw_frame(CRITEO.spec, request.tensors)
        np.testing.assert_array_equal(result["sparse"], CRITEO.transform(frame).sparse)
