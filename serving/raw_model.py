"""The raw-feature model: clients send raw columns under one stable name; Triton preprocesses and scores them.

For a tensor-level model ``<name>`` (unchanged: clients that preprocess themselves keep using it) the repository
gets three more models (``RawModelNames``), written by every export:

- ``<name>_raw``: a Triton ensemble (``platform: "ensemble"``, Triton's own scheduler), the model clients call.
  Inputs: one per raw column; outputs: ``<name>``'s outputs and ``model_version`` (``recops.serving.raw_features``).
- step 1, ``<name>_raw_preprocess`` (python backend, code ``triton_models/raw_preprocess.py``): picks the model
  version of each request and turns its raw columns into ``<name>``'s inputs with ``Preprocessor.transform``, the
  code training used, configured by that version's own ``preprocess.json``, read from ``<name>/<version>/``.
- step 2, ``<name>_raw_score`` (python backend, ``triton_models/raw_score.py``): runs ``<name>`` at that version
  (a BLS request) and returns its outputs.

Why the version is picked in step 1 and not by the ensemble: an ensemble's config pins each step's model version,
so one ensemble cannot follow a per-request choice between production and canary. The version is the request
parameter ``version`` when given; else the deployment record's split (``recops.serving.deploy.route``, the rule
the Python ``Router`` uses) on the request's key (parameter ``key``, else the request id, else a random one);
without a deployment record, the newest version in the repository. The ensemble thus serves every loaded version
of ``<name>``, follows deploy / promote / rollback without a reload, and ``model_version`` says who answered.
"""

from __future__ import annotations

import importlib.resources
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recops.errors import RecopsError
from recops.serving.deploy import DeployRecord, route
from recops.serving.errors import ServingError
from recops.serving.onnx_model import ExportRecord, FeatureLayout, TensorSpec, read_preprocessor
from recops.serving.raw_features import (
    KEY_PARAMETER,
    MODEL_VERSION,
    VERSION_PARAMETER,
    RawColumns,
    RawInputError,
    RawModelNames,
    merge_raw,
    raw_columns,
    raw_frame,
    raw_rows,
)
from recops.serving.repository import (
    CONFIG_FILE,
    MAX_NAME,
    ONNX_FILE,
    SETTINGS_FILE,
    DynamicBatching,
    EnsembleConfig,
    EnsembleStep,
    ModelConfig,
    ModelRepository,
    ServingOptions,
    read_signature,
    without_batch,
)
from recops.training.preprocess import Preprocessor

MODEL_PARAMETER = "model"  # config parameter of both steps: the tensor-level model's name
_VERSION_OUTPUT = TensorSpec(MODEL_VERSION, "INT64", (-1, 1))


def shared_code(file: str) -> Path:
    """A python-backend model file of ``triton_models/`` (the package ``recops.triton_models``)."""
    return Path(str(importlib.resources.files("recops.triton_models").joinpath(file)))


def check_raw_names(repo: ModelRepository, name: str) -> RawModelNames:
    """The raw-feature model names of ``name``, refused when one of them is a tensor-level model (it has a settings
    file) or ``name`` itself is a step or ensemble written here."""
    names = RawModelNames(name)
    if len(names.preprocess) > MAX_NAME:  # the longest name written for it
        limit = MAX_NAME - len(names.preprocess) + len(name)
        raise RecopsError(f"model name {name[:40]!r}... is too long for its raw-feature model: use at most {limit}")
    for generated in (names.raw, names.preprocess, names.score):
        if (repo.model_dir(generated) / SETTINGS_FILE).is_file():
            raise RecopsError(
                f"model {name!r} cannot get its raw-feature model: {generated!r} is a model of its own in "
                f"{repo.root}; serve {name!r} under another name"
            )
    folder = repo.model_dir(name)
    if (folder / CONFIG_FILE).is_file() and not (folder / SETTINGS_FILE).is_file():
        raise RecopsError(f"{name!r} is a model written by recops around another model; choose another name")
    return names


def check_compatible(repo: ModelRepository, name: str, export_dir: Path) -> None:
    """Refuse an export whose raw columns or ONNX inputs/outputs differ from ``name``'s newest version: one
    raw-feature model serves every version of a model."""
    versions = repo.versions(name)
    if not versions:
        return
    newest = repo.model_dir(name) / str(versions[-1])
    for what, mine, theirs in (
        ("raw columns", read_preprocessor(export_dir).spec.columns[1:], read_preprocessor(newest).spec.columns[1:]),
        ("ONNX inputs/outputs", read_signature(export_dir / ONNX_FILE), read_signature(newest / ONNX_FILE)),
    ):
        if mine != theirs:
            raise RecopsError(
                f"this export has other {what} than version {versions[-1]} of {name!r}, and one raw-feature model "
                "serves every version of a model: serve it under a new model name"
            )


def write_raw_model(repo: ModelRepository, name: str, version: int) -> str:
    """Write the raw-feature model of ``name`` (its ensemble and steps, with the shared code from
    ``triton_models/``) for ``version``'s signature and columns; unchanged files are left alone. Returns the
    ensemble's name."""
    names = check_raw_names(repo, name)
    folder = repo.model_dir(name) / str(version)
    options = repo.settings(name)[1]
    if options.max_batch_size <= 0:
        raise RecopsError(f"model {name!r}: the raw-feature model needs batching; export with max_batch_size > 0")
    columns = raw_columns(read_preprocessor(folder).spec, options.raw_dense)
    inputs, outputs, _ = read_signature(folder / ONNX_FILE)
    features = (*inputs, _VERSION_OUTPUT)
    steps = ServingOptions(
        max_batch_size=options.max_batch_size,
        dynamic_batching=DynamicBatching(),
        instance_count=options.instance_count,
        warmup=(),
    )
    parameters = ((MODEL_PARAMETER, name),)
    step_1 = ModelConfig(names.preprocess, "cpu", without_batch(columns), without_batch(features), steps, parameters)
    step_2 = ModelConfig(names.score, "cpu", without_batch(features), without_batch(outputs), steps, parameters)
    repo.write_python_model(step_1, shared_code("raw_preprocess.py"))
    repo.write_python_model(step_2, shared_code("raw_score.py"))
    repo.write_ensemble(
        EnsembleConfig(
            names.raw,
            options.max_batch_size,
            without_batch(columns),
            without_batch((*outputs, _VERSION_OUTPUT)),
            (
                EnsembleStep(names.preprocess, _same(columns), _same(features)),
                EnsembleStep(names.score, _same(features), _same(outputs)),
            ),
        )
    )
    return names.raw


def _same(specs: tuple[TensorSpec, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((s.name, s.name) for s in specs)


# ---- step 1: what <name>_raw_preprocess runs ----------------------------------------------------------------------
@dataclass(frozen=True)
class RawRequest:
    """One request as step 1 sees it: its raw tensors, request parameters and id."""

    tensors: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class _Version:
    stamp: tuple[int, int]
    preprocessor: Preprocessor
    layout: FeatureLayout


class PreprocessStep:
    """Chooses each request's version and preprocesses its rows with that version's preprocessor; requests for one
    version are transformed together (a failure there is retried request by request, so it lands on its cause)."""

    def __init__(self, repo: ModelRepository, name: str, outputs: dict[str, np.dtype]):
        self.repo, self.name, self.outputs = repo, name, outputs
        self.record = DeployRecord(repo, name)
        self._versions: dict[int, _Version] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any], repo_root: Path) -> PreprocessStep:
        """The step for a model config as Triton hands it to ``initialize`` (JSON), in repository ``repo_root``."""
        outputs = {
            o["name"]: TensorSpec(o["name"], o["data_type"].removeprefix("TYPE_"), ()).numpy_dtype
            for o in config["output"]
        }
        name = config["parameters"][MODEL_PARAMETER]["string_value"]
        return cls(ModelRepository(repo_root), name, outputs)

    def run(self, requests: list[RawRequest]) -> list[dict[str, np.ndarray] | Exception]:
        """Per request: its outputs (the tensor-level model's inputs and ``model_version``) or the error."""
        results: list[dict[str, np.ndarray] | Exception | None] = [None] * len(requests)
        groups: dict[int, list[tuple[int, RawColumns]]] = {}
        for i, request in enumerate(requests):
            try:
                version = self.version(request)
                frame = raw_frame(self._load(version).preprocessor.spec, request.tensors)
                groups.setdefault(version, []).append((i, frame))
            except Exception as exc:  # noqa: BLE001 - reported on this request; the stub must not fail
                results[i] = exc
        for version, members in groups.items():
            for i, outputs in self._transform(version, members):
                results[i] = outputs
        return results

    def version(self, request: RawRequest) -> int:
        """The asked version (parameter), else the deployment's choice for the request's key, else the newest."""
        asked = request.parameters.get(VERSION_PARAMETER)
        if asked is not None:
            return self._asked(asked)
        state = self.record.state()
        if state.production is None:
            versions = self.repo.versions(self.name)
            if not versions:
                raise ServingError(f"model {self.name!r} has no version in {self.repo.root}; export one")
            state = replace(state, production=versions[-1], canary=None)
        key = request.parameters.get(KEY_PARAMETER) or request.request_id or uuid.uuid4().hex
        return route(state, str(key))[0]

    def _asked(self, asked: Any) -> int:
        try:
            version = int(str(asked))
        except ValueError:
            version = 0
        if version < 1 or version not in self.repo.versions(self.name):
            raise RawInputError(
                f"request parameter {VERSION_PARAMETER}={str(asked)[:20]!r}: model {self.name!r} has versions "
                f"{self.repo.versions(self.name)}; ask for one of them, or leave it out to follow the deployment"
            )
        return version

    def _load(self, version: int) -> _Version:
        """``version``'s preprocessor and layout, read again when its directory was replaced."""
        folder = self.repo.model_dir(self.name) / str(version)
        info = os.stat(folder)
        stamp = (info.st_ino, info.st_mtime_ns)
        cached = self._versions.get(version)
        if cached is None or cached.stamp != stamp:
            record = ExportRecord.read(folder)
            if record is None:
                raise ServingError(f"{folder} has no export.json; export version {version} with `recops export`")
            cached = self._versions[version] = _Version(stamp, read_preprocessor(folder), record.layout)
        return cached

    def _transform(self, version: int, members: list[tuple[int, RawColumns]]):
        """(index, outputs or error) for each member; one transform for all of them when it succeeds."""
        if len(members) > 1:
            try:
                merged = self._features(version, merge_raw([columns for _, columns in members]))
                bounds = np.cumsum([raw_rows(columns) for _, columns in members])[:-1]
                parts = {name: np.split(values, bounds) for name, values in merged.items()}
                return [(i, {name: part[k] for name, part in parts.items()}) for k, (i, _) in enumerate(members)]
            except Exception:  # noqa: BLE001 - fall through: find the failing request(s) one by one
                pass
        return [(i, self._one(version, frame)) for i, frame in members]

    def _one(self, version: int, frame: RawColumns) -> dict[str, np.ndarray] | Exception:
        try:
            return self._features(version, frame)
        except Exception as exc:  # noqa: BLE001 - reported on this request
            return exc

    def _features(self, version: int, columns: RawColumns) -> dict[str, np.ndarray]:
        loaded = self._load(version)
        features = loaded.preprocessor.transform(columns)
        inputs = loaded.layout.features_inputs(features.dense, features.sparse, features.multi)
        inputs[MODEL_VERSION] = np.full((raw_rows(columns), 1), version, np.int64)
        missing = set(self.outputs) - set(inputs)
        if missing:
            raise ServingError(
                f"version {version} of {self.name!r} yields no {sorted(missing)}: its inputs differ from the "
                "raw-feature model's; export it again"
            )
        return {name: np.ascontiguousarray(inputs[name], dtype) for name, dtype in self.outputs.items()}
