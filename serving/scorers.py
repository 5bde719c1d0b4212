"""Scoring processed rows with a model: in process with ONNX Runtime on an export, or through a Triton server.

Both scorers carry the model's own preprocessor, so raw rows are prepared exactly as for training. A checkpoint is
scored through an ONNX export of it (:func:`exported_checkpoint`, made once per checkpoint and parity-gated), the
same graph Triton serves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir
from recops.serving.client import Predictor
from recops.serving.errors import require_finite
from recops.serving.export import check_parity, export_onnx
from recops.serving.onnx_model import ExportRecord, onnx_probabilities, onnx_session, read_preprocessor
from recops.serving.repository import ONNX_FILE
from recops.training.checkpoint import Checkpoint
from recops.training.preprocess import Features, Preprocessor


class OnnxScorer:
    """ONNX Runtime (CPU) on an export or repository version directory."""

    def __init__(self, model_dir: Path, threads: int = 0):
        record = ExportRecord.read(model_dir)
        if record is None:
            raise RecopsError(f"{model_dir} holds no export.json; pass a directory written by `recops export`")
        self.layout, self.preprocessor = record.layout, read_preprocessor(model_dir)
        self.session = onnx_session(Path(model_dir) / ONNX_FILE, threads=threads, device="cpu")
        self.description = f"ONNX Runtime on {model_dir}"
        self.versions: set[str] = set()

    def score(self, features: Features) -> np.ndarray:
        inputs = self.layout.features_inputs(features.dense, features.sparse, features.multi)
        return require_finite(onnx_probabilities(self.session, inputs), self.description).ravel().astype(np.float64)

    def close(self) -> None:
        self.session = None


class TritonScorer:
    """A served model (``version`` None: the server's choice), fed rows prepared by ``preprocessor``."""

    def __init__(
        self,
        url: str,
        name: str,
        preprocessor: Preprocessor,
        version: int | None = None,
        protocol: str = "http",
        batch_size: int = 4096,
    ):
        self.preprocessor, self.version = preprocessor, version
        self.predictor = Predictor(url, name, protocol=protocol, batch_size=batch_size, timeout_s=60.0)
        self.description = f"Triton {url} model {name}" + (f" version {version}" if version else "")
        self.versions: set[str] = set()  # the versions that answered

    def score(self, features: Features) -> np.ndarray:
        result = self.predictor.predict(self.predictor.feature_inputs(features), model_version=self.version or "")
        self.versions.update(result.model_versions)
        return next(iter(result.outputs.values())).ravel().astype(np.float64)

    def close(self) -> None:
        self.predictor.close()


def exported_checkpoint(checkpoint: Checkpoint, cache: Path) -> Path:
    """An ONNX export of ``checkpoint`` under ``cache/<fingerprint>`` (made once, behind the parity gate)."""
    target = Path(cache) / checkpoint.fingerprint[:20]
    if ExportRecord.read(target) is not None:
        return target
    remove_stale(target.parent)
    with staging_dir(target) as tmp:
        exported = export_onnx(checkpoint, tmp)
        check_parity(exported)
        try:
            tmp.rename(target)
        except OSError:
            if ExportRecord.read(target) is None:  # not a concurrent export of the same checkpoint
                raise
    return target
