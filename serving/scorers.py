"""Scoring rows with a model: in process with ONNX Runtime on an export, or through a Triton server.

Both scorers carry the model's own preprocessor, so raw rows are prepared exactly as for training: ``score`` takes
processed features, ``score_frame`` raw rows (a served model with a raw-feature model gets them raw, preprocessed
and routed by the server, and says which version answered each row). A checkpoint is scored through an ONNX export
of it (:func:`exported_checkpoint`, made once per checkpoint and parity-gated), the same graph Triton serves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir
from recops.serving.client import Prediction, Predictor, raw_predictor
from recops.serving.errors import require_finite
from recops.serving.export import check_parity, export_onnx
from recops.serving.onnx_model import ExportRecord, onnx_probabilities, onnx_session, read_preprocessor
from recops.serving.repository import ONNX_FILE, ModelRepository
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

    def score_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, None]:
        """Scores of raw rows (no served version)."""
        return self.score(self.preprocessor.transform(frame)), None

    def close(self) -> None:
        self.session = None


class TritonScorer:
    """A served model (``version`` None: the server's choice, or the deployment's split on the raw-feature model),
    fed rows prepared by ``preprocessor``: in the server by the model's raw-feature model when ``repo`` has one and
    the server has it loaded, else here."""

    def __init__(
        self,
        url: str,
        name: str,
        preprocessor: Preprocessor,
        version: int | None = None,
        protocol: str = "http",
        batch_size: int = 4096,
        repo: ModelRepository | None = None,
    ):
        self.preprocessor, self.version = preprocessor, version
        options = {"protocol": protocol, "batch_size": batch_size, "timeout_s": 60.0}
        self.predictor = Predictor(url, name, **options)
        self.raw = repo and raw_predictor(url, repo, name, **options)
        served = f"model {self.raw.model_name} (raw rows)" if self.raw else f"model {name}"
        self.description = f"Triton {url} {served}" + (f" version {version}" if version else "")
        self.versions: set[str] = set()  # the versions that answered

    def score(self, features: Features) -> np.ndarray:
        return self._tensor(features)[0]

    def score_frame(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Scores of raw rows and the version that answered each."""
        if self.raw is None:
            return self._tensor(self.preprocessor.transform(frame))
        return self._answered(
            self.raw.predict_rows(frame, version=self.version, separator=self.preprocessor.spec.separator)
        )

    def _tensor(self, features: Features) -> tuple[np.ndarray, np.ndarray]:
        inputs = self.predictor.feature_inputs(features)
        return self._answered(self.predictor.predict(inputs, model_version=self.version or ""))

    def _answered(self, result: Prediction) -> tuple[np.ndarray, np.ndarray]:
        versions = result.row_versions
        self.versions.update(str(v) for v in np.unique(versions))
        return result.scores.ravel().astype(np.float64), versions

    def close(self) -> None:
        self.predictor.close()
        if self.raw:
            self.raw.close()


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
