"""An exported model without torch: its input layout, its ``export.json``, and scoring it with ONNX Runtime.

Input contract (shared with ``recops.serving.client.features_to_inputs``), B = batch:

- ``dense``  float32 [B, num_dense] (only when the model has dense features)
- ``sparse`` int64 [B, S]: one id per categorical feature, in ``ModelConfig.tables`` order
- per multi-hot feature ``<f>``: ``multi_<f>`` int64 [B, L] ids (-1 = padding) and ``mask_<f>`` float32 [B, L]

Output ``probability`` float32 [B, 1].
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.training.config import ModelConfig
from recops.training.dataset import DatasetRef
from recops.training.preprocess import Preprocessor
from recops.training.spec import ColumnSpec

OUTPUT_NAME = "probability"
PREPROCESS_FILE = "preprocess.json"  # the preprocessor shipped with every exported version
EXPORT_FILE = "export.json"
_NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton datatype (FP32, INT64, BYTES, ...) and dims (-1 = any size)."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class FeatureLayout:
    """Which tables are one-hot (the ``sparse`` columns) and which multi-hot (with their padded length)."""

    num_dense: int
    tables: dict[str, int]  # feature -> rows, in model order
    sparse: tuple[str, ...]
    multi_hot: dict[str, int]  # feature -> max ids per row

    @classmethod
    def of(cls, model: ModelConfig, spec: ColumnSpec) -> FeatureLayout:
        """A trained model's layout (its config and the column spec it was trained on); checks the table order."""
        layout = cls(
            model.num_dense, dict(model.tables), tuple(spec.sparse), {k: int(v) for k, v in spec.multi_hot.items()}
        )
        expected = [*layout.sparse, *layout.multi_hot]
        if list(layout.tables) != expected:
            raise RecopsError(
                f"model tables {list(layout.tables)} are not in the preprocessor's feature order "
                f"{expected} (categorical then multi-hot); re-train with the dataset's table_sizes"
            )
        return layout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureLayout:
        return cls(data["num_dense"], dict(data["tables"]), tuple(data["sparse"]), dict(data["multi_hot"]))

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, batch first: ``dense`` and ``sparse`` (each absent without such columns), and per
        multi-hot feature ``multi_<f>`` and ``mask_<f>``."""
        specs = [TensorSpec("dense", "FP32", (-1, self.num_dense))] if self.num_dense else []
        specs += [TensorSpec("sparse", "INT64", (-1, len(self.sparse)))] if self.sparse else []
        for name, length in self.multi_hot.items():
            specs += [
                TensorSpec(f"multi_{name}", "INT64", (-1, length)),
                TensorSpec(f"mask_{name}", "FP32", (-1, length)),
            ]
        return tuple(specs)

    def random_inputs(self, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Valid random inputs: dense like log1p counts, ids inside each table, multi-hot rows of 0..L ids."""
        inputs = {}
        if self.sparse:
            inputs["sparse"] = np.stack([rng.integers(0, self.tables[f], rows) for f in self.sparse], axis=1)
        if self.num_dense:
            inputs["dense"] = rng.exponential(1.5, (rows, self.num_dense)).astype(np.float32)
        for name, length in self.multi_hot.items():
            ids = rng.integers(0, self.tables[name], (rows, length))
            keep = np.arange(length)[None, :] < rng.integers(0, length + 1, (rows, 1))
            inputs[f"multi_{name}"] = np.where(keep, ids, -1).astype(np.int64)
            inputs[f"mask_{name}"] = keep.astype(np.float32)
        return inputs

    def features_inputs(
        self, dense: np.ndarray, sparse: np.ndarray, multi: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Model inputs from ``Features``-style arrays (multi-hot ids -1 padded)."""
        inputs = {"sparse": np.ascontiguousarray(sparse, np.int64)} if self.sparse else {}
        if self.num_dense:
            inputs["dense"] = np.ascontiguousarray(dense, np.float32)
        for name in self.multi_hot:
            ids = np.ascontiguousarray(multi[name], np.int64)
            inputs[f"multi_{name}"], inputs[f"mask_{name}"] = ids, (ids >= 0).astype(np.float32)
        return inputs


@dataclass(frozen=True)
class ModelLineage:
    """Which model an export is: its registry version (None if never registered), checkpoint (path and
    fingerprint) and training dataset; and, once published, the Triton model name, version and repository."""

    checkpoint: str
    fingerprint: str
    dataset: DatasetRef
    registry_version: int | None = None
    registry: str | None = None
    model: str | None = None
    version: int | None = None
    repository: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dataset": self.dataset.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelLineage:
        return cls(**{**data, "dataset": DatasetRef.from_dict(data["dataset"])})


@dataclass(frozen=True)
class ExportRecord:
    """``export.json``, the only reader and writer of it: how a model was exported, its inputs, the parity
    gate's report and its lineage. It lies beside ``model.onnx`` in an export and in every repository version."""

    layout: FeatureLayout
    exporter: str  # "dynamo" or "torchscript"
    fp16: bool
    external_data: bool
    lineage: ModelLineage
    parity: dict[str, Any] | None = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.layout.input_specs()

    def to_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "fp16": self.fp16,
            "external_data": self.external_data,
            "inputs": [s.to_dict() for s in self.inputs],
            "output": OUTPUT_NAME,
            "layout": self.layout.to_dict(),
            "lineage": self.lineage.to_dict(),
            "parity": self.parity,
        }

    def write(self, directory: Path) -> Path:
        return write_json_atomic(Path(directory) / EXPORT_FILE, self.to_dict())

    @classmethod
    def read(cls, directory: Path) -> ExportRecord | None:
        """The record in ``directory``; None if it has none."""
        path = Path(directory) / EXPORT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(
                FeatureLayout.from_dict(data["layout"]),
                data["exporter"],
                data["fp16"],
                data["external_data"],
                ModelLineage.from_dict(data["lineage"]),
                data.get("parity"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecopsError(f"{path} is unreadable ({type(exc).__name__}: {exc}); export the model again") from exc


def read_preprocessor(directory: Path) -> Preprocessor:
    """The preprocessor shipped with an export or repository version (its ``preprocess.json``)."""
    return Preprocessor.from_dict(preprocessor_dict(directory))


def preprocessor_dict(directory: Path) -> dict[str, Any]:
    """``preprocess.json`` of an export or repository version, as written (``Preprocessor.to_dict()``)."""
    path = Path(directory) / PREPROCESS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecopsError(
            f"{directory} has no {PREPROCESS_FILE}: export the model with `recops export`, or pass "
            "the preprocessor file explicitly"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecopsError(f"{path} is unreadable ({type(exc).__name__}: {exc}); export the model again") from exc


CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"


def onnx_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: ``cpu``; ``cuda`` (CPU after it, as ONNX Runtime's fallback); ``auto``
    = ``cuda`` where this onnxruntime has the CUDA provider (the onnxruntime-gpu wheel), else ``cpu``."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise RecopsError(f"onnxruntime device {device!r}: use auto, cpu or cuda")
    has_cuda = CUDA_PROVIDER in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        warnings.warn(
            f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (install the onnxruntime-gpu "
            f"extra: pip install 'recops[gpu]'); running on CPU",
            RuntimeWarning,
            stacklevel=3,
        )
    return [CUDA_PROVIDER, CPU_PROVIDER] if has_cuda and device != "cpu" else [CPU_PROVIDER]


def onnx_session(onnx_path: Path, threads: int = 0, device: str = "auto"):
    """An onnxruntime session on ``device`` (see :func:`onnx_providers`; ``threads`` 0 = onnxruntime's default
    intra-op threads). A CUDA provider that fails to start (no visible GPU, driver or cuDNN mismatch) falls
    back to CPU with a warning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers = onnx_providers(device)
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as exc:
        raise RecopsError(f"onnxruntime cannot load {onnx_path}: {exc}; re-export the model") from exc
    if CUDA_PROVIDER in providers and CUDA_PROVIDER not in session.get_providers():
        warnings.warn(
            f"onnxruntime could not start {CUDA_PROVIDER} for {onnx_path} (see its log above: driver, "
            f"cuDNN or no visible GPU); running on CPU",
            RuntimeWarning,
            stacklevel=2,
        )
    return session


def onnx_probabilities(session, inputs: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """The ``probability`` output for contract-named ``inputs``, in chunks of ``batch_size`` rows."""
    names = [i.name for i in session.get_inputs()]
    n = len(inputs[names[0]])
    parts = [
        session.run([OUTPUT_NAME], {k: inputs[k][s : s + batch_size] for k in names})[0]
        for s in range(0, n, batch_size)
    ]
    return np.concatenate(parts)
