"""Offline evaluation: score rows with a model and report AUC, logloss, normalized entropy, calibration and
per-slice AUC; compare two models on the same rows. ``recops evaluate`` and the loop's validation gate use it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recops.errors import RecopsError
from recops.serving.onnx_model import ExportRecord, onnx_probabilities, onnx_session
from recops.training.preprocess import Features


def score_onnx(model_dir: Path, features: Features, rows: int | None = None) -> np.ndarray:
    """Probabilities of the first ``rows`` rows of processed ``features`` from the ONNX model in ``model_dir``
    (an export or a repository version), in process with ONNX Runtime (CPU)."""
    record = ExportRecord.read(model_dir)
    if record is None:
        raise RecopsError(f"{model_dir} holds no export.json; pass a directory written by `recops export`")
    n = len(features) if rows is None else rows
    inputs = record.layout.features_inputs(features.dense[:n], features.sparse[:n],
                                           {k: v[:n] for k, v in features.multi.items()})
    session = onnx_session(Path(model_dir) / "model.onnx", threads=1, device="cpu")
    return onnx_probabilities(session, inputs).ravel().astype(np.float64)
