"""An exported model without torch: its input layout, its ``export.json``, and scoring it with ONNX Runtime.

Input contract (shared with ``recops.serving.client.features_to_inputs``), B = batch:

- ``dense``  float32 [B, num_dense]
- ``sparse`` int64 [B, S]: one id per categorical feature, in ``ModelConfig.tables`` order
- per multi-hot feature ``<f>``: ``multi_<f>`` int64 [B, L] ids (-1 = padding) and ``mask_<f>`` float32 [B, L]

Output ``probability`` float32 [B, 1].
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recops.errors import RecopsError

OUTPUT_NAME = "probability"
PREPROCESS_FILE = "preprocess.json"  # the name `recops predict` looks for in a version directory
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name, shape (-1 = dynamic batch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FeatureLayout:
    """Which tables are one-hot (the ``sparse`` columns) and which multi-hot (with their padded length)."""

    num_dense: int
    tables: dict[str, int]  # feature -> rows, in model order
    sparse: tuple[str, ...]
    multi_hot: dict[str, int]  # feature -> max ids per row

    @classmethod
    def from_trainer(cls, trainer: dict[str, Any]) -> FeatureLayout:
        """From a checkpoint's trainer.json ("model" config + "preprocessor" spec); checks the table order."""
        spec = trainer["preprocessor"]["spec"]
        layout = cls(int(trainer["model"]["num_dense"]), dict(trainer["model"]["tables"]), tuple(spec["sparse"]),
                     {k: int(v) for k, v in spec.get("multi_hot", {}).items()})
        expected = [*layout.sparse, *layout.multi_hot]
        if list(layout.tables) != expected:
            raise RecopsError(f"checkpoint tables {list(layout.tables)} are not in the preprocessor's feature order "
                              f"{expected} (categorical then multi-hot); re-train with the dataset's table_sizes")
        return layout

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureLayout:
        return cls(data["num_dense"], dict(data["tables"]), tuple(data["sparse"]), dict(data["multi_hot"]))

    def input_specs(self) -> tuple[InputSpec, ...]:
        specs = [InputSpec("dense", "float32", (-1, self.num_dense)), InputSpec("sparse", "int64", (-1, len(self.sparse)))]
        for name, length in self.multi_hot.items():
            specs += [InputSpec(f"multi_{name}", "int64", (-1, length)), InputSpec(f"mask_{name}", "float32", (-1, length))]
        return tuple(specs)

    def random_inputs(self, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Valid random inputs: dense like log1p counts, ids inside each table, multi-hot rows of 0..L ids."""
        inputs = {"dense": rng.exponential(1.5, (rows, self.num_dense)).astype(np.float32),
                  "sparse": np.stack([rng.integers(0, self.tables[f], rows) for f in self.sparse], axis=1)
                  if self.sparse else np.zeros((rows, 0), np.int64)}
        for name, length in self.multi_hot.items():
            ids = rng.integers(0, self.tables[name], (rows, length))
            keep = np.arange(length)[None, :] < rng.integers(0, length + 1, (rows, 1))
            inputs[f"multi_{name}"] = np.where(keep, ids, -1).astype(np.int64)
            inputs[f"mask_{name}"] = keep.astype(np.float32)
        return inputs

    def features_inputs(self, dense: np.ndarray, sparse: np.ndarray, multi: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs from ``Features``-style arrays (multi-hot ids -1 padded)."""
        inputs = {"dense": np.ascontiguousarray(dense, np.float32), "sparse": np.ascontiguousarray(sparse, np.int64)}
        for name in self.multi_hot:
            ids = np.ascontiguousarray(multi[name], np.int64)
            inputs[f"multi_{name}"], inputs[f"mask_{name}"] = ids, (ids >= 0).astype(np.float32)
        return inputs


def read_export_metadata(version_dir: Path) -> dict[str, Any] | None:
    """``export.json`` of an export or version directory, or None if it has none."""
    path = Path(version_dir) / EXPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"


def onnx_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: ``cpu``; ``cuda`` (CPU after it, as ONNX Runtime's fallback); ``auto``
    = ``cuda`` where this onnxruntime has the CUDA provider (the onnxruntime-gpu wheel), else ``cpu``."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise RecopsError(f"onnxruntime device {device!r}: use auto, cpu or cuda")
    has_cuda = CUDA_PROVIDER in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        warnings.warn(f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (install the onnxruntime-gpu "
                      f"extra: pip install 'recops[gpu]'); running on CPU", RuntimeWarning, stacklevel=3)
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
        warnings.warn(f"onnxruntime could not start {CUDA_PROVIDER} for {onnx_path} (see its log above: driver, "
                      f"cuDNN or no visible GPU); running on CPU", RuntimeWarning, stacklevel=2)
    return session


def onnx_probabilities(session, inputs: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """The ``probability`` output for contract-named ``inputs``, in chunks of ``batch_size`` rows."""
    names = [i.name for i in session.get_inputs()]
    n = len(inputs["dense"])
    parts = [session.run([OUTPUT_NAME], {k: inputs[k][s:s + batch_size] for k in names})[0]
             for s in range(0, n, batch_size)]
    return np.concatenate(parts)
