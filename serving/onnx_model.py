"""An exported model without torch: its input layout, its ``export.json``, and scoring it with ONNX Runtime.

Input contract (shared with ``serving.client.features_to_inputs``), B = batch:

- ``dense``  float32 [B, num_dense]
- ``sparse`` int64 [B, S]: one id per categorical feature, in ``ModelConfig.tables`` order
- per multi-hot feature ``<f>``: ``multi_<f>`` int64 [B, L] ids (-1 = padding) and ``mask_<f>`` float32 [B, L]

Output ``probability`` float32 [B, 1].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import RecopsError

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


def onnx_session(onnx_path: Path, threads: int = 0):
    """An onnxruntime CPU session (``threads`` 0 = onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RecopsError(f"onnxruntime cannot load {onnx_path}: {exc}; re-export the model") from exc


def onnx_probabilities(session, inputs: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """The ``probability`` output for contract-named ``inputs``, in chunks of ``batch_size`` rows."""
    names = [i.name for i in session.get_inputs()]
    n = len(inputs["dense"])
    parts = [session.run([OUTPUT_NAME], {k: inputs[k][s:s + batch_size] for k in names})[0]
             for s in range(0, n, batch_size)]
    return np.concatenate(parts)
