"""Offline evaluation: score labelled rows with a model and report AUC, logloss, normalized entropy, calibration and
per-slice AUC; compare two models on the same rows with bootstrap confidence intervals.

The model is a checkpoint, a registry version or alias (both scored in process by ONNX Runtime on their export) or
a model served by Triton; the rows are a processed dataset's split or raw labelled files, prepared by the model's
own preprocessor. ``recops evaluate`` and the loop's validation gate use this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.ops.registry import ModelRegistry
from recops.serving.deploy import committed_state, recover_deployment
from recops.serving.onnx_model import read_preprocessor
from recops.serving.repository import ModelRepository
from recops.serving.scorers import OnnxScorer, TritonScorer, exported_checkpoint
from recops.training.checkpoint import Checkpoint
from recops.training.dataset import MANIFEST_FILE, Dataset
from recops.training.inputs import expand_inputs
from recops.training.metrics import auc, logloss
from recops.training.preprocess import Features, Preprocessor
from recops.training.readers import read_chunks
from recops.training.spec import ColumnSpec

Scorer = OnnxScorer | TritonScorer


@dataclass(frozen=True)
class ModelSource:
    """Which model scores: a checkpoint directory, a registry version or alias, or a model served by Triton
    (``url`` + ``name``, optionally one ``version``; its preprocessing comes from the model repository)."""

    checkpoint: Path | None = None
    model_version: str | None = None
    url: str | None = None
    name: str | None = None
    version: int | None = None
    protocol: str = "http"

    def __post_init__(self) -> None:
        given = [self.checkpoint is not None, self.model_version is not None, self.url is not None]
        if sum(given) != 1 or (self.url is None) != (self.name is None):
            raise RecopsError("choose one model: --checkpoint DIR, --model-version V|ALIAS, or --url URL --name NAME")


@dataclass(frozen=True)
class ScorerFactory:
    """How to open the scorer a source names, where the rows are scored (this process or a Ray worker): paths and
    settings only, no session or connection, so it pickles."""

    preprocessor: Preprocessor
    model_dir: Path | None = None  # an ONNX export, scored in process
    served: tuple[str, str, int | None, str] | None = None  # Triton: url, model name, version, protocol
    repo: ModelRepository | None = None  # the served model's repository (its raw-feature model, if any)

    def open(self, threads: int = 0) -> Scorer:
        """The scorer (``threads``: ONNX Runtime's intra-op threads, 0 = its default)."""
        if self.served is None:
            return OnnxScorer(self.model_dir, threads=threads)
        url, name, version, protocol = self.served
        return TritonScorer(url, name, self.preprocessor, version, protocol, repo=self.repo)


def scorer_factory(source: ModelSource, registry: ModelRegistry, repo: ModelRepository, cache: Path) -> ScorerFactory:
    """The factory of ``source``'s scorer; local models are exported once into ``cache``."""
    if source.url is None:
        path = source.checkpoint if source.checkpoint is not None else registry.resolve(source.model_version).checkpoint
        export = exported_checkpoint(Checkpoint.open(path), cache)
        return ScorerFactory(read_preprocessor(export), model_dir=export)
    versions = repo.versions(source.name)
    if source.protocol == "http":  # a deployment a crash cut short is recovered on the server first
        recover_deployment(repo, source.name, source.url, wait=False)
    version = source.version or committed_state(repo, source.name).production or (versions[-1] if versions else None)
    if version not in versions:
        raise RecopsError(
            f"model {source.name!r} version {version} is not in {repo.root} (versions: {versions}); its "
            "preprocessing is read from there: pass --repo"
        )
    preprocessor = read_preprocessor(repo.model_dir(source.name) / str(version))
    return ScorerFactory(preprocessor, served=(source.url, source.name, source.version, source.protocol), repo=repo)


def open_scorer(source: ModelSource, registry: ModelRegistry, repo: ModelRepository, cache: Path) -> Scorer:
    """A scorer for ``source``; local models are exported once into ``cache``."""
    return scorer_factory(source, registry, repo, cache).open()


@dataclass
class Labelled:
    """Rows to evaluate on: processed features, labels, and the raw values of the slice columns."""

    features: Features
    labels: np.ndarray
    slices: pd.DataFrame
    source: str


def labelled_rows(
    data: str | Path | list[str | Path],
    preprocessor: Preprocessor,
    split: str = "test",
    spec: ColumnSpec | None = None,
    slice_columns: tuple[str, ...] = (),
) -> Labelled:
    """A processed dataset's ``split`` (made with the model's preprocessing) or raw labelled files (files,
    directories, globs)."""
    names = [data] if isinstance(data, (str, Path)) else list(data)
    if len(names) == 1 and (Path(names[0]) / MANIFEST_FILE).is_file():
        return _dataset_rows(Dataset.open(names[0]), preprocessor, split, slice_columns)
    paths = expand_inputs(names)
    spec = spec or preprocessor.spec
    chunks = [c for path in paths for c in read_chunks(path, spec, passthrough=slice_columns)]
    frames = [c.frame for c in chunks if len(c.frame)]
    if not frames:
        rejected = sum(len(c.rejects) for c in chunks)
        raise RecopsError(
            f"{', '.join(map(str, paths))}: no labelled row to evaluate ({rejected} rejected); pass "
            "rows in the model's format with their labels (--spec for CSV/Parquet)"
        )
    frame = pd.concat(frames, ignore_index=True)
    features = preprocessor.transform(frame)
    return Labelled(
        features, np.asarray(frame[spec.label], np.float64), frame[list(slice_columns)], ", ".join(map(str, paths))
    )


def _dataset_rows(dataset: Dataset, preprocessor: Preprocessor, split: str, slice_columns: tuple[str, ...]) -> Labelled:
    if _normal(dataset.preprocessor_dict) != _normal(preprocessor.to_dict()):
        raise RecopsError(
            f"dataset {dataset.path} was processed differently from the model's preprocessing; "
            "evaluate on the raw files instead (--data FILE --spec YAML)"
        )
    features = dataset.split(split)
    categorical = list(dataset.spec.sparse)
    unknown = [c for c in slice_columns if c not in categorical]
    if unknown:
        raise RecopsError(
            f"--slices {unknown}: a processed dataset slices by its categorical columns "
            f"({', '.join(categorical)}); pass the raw file to slice by other columns"
        )
    slices = pd.DataFrame({c: np.asarray(features.sparse[:, categorical.index(c)]) for c in slice_columns})
    return Labelled(features, np.asarray(features.label, np.float64), slices, f"{dataset.path} ({split} split)")


def _normal(data: Any) -> Any:
    return json.loads(json.dumps(data))


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """AUC, logloss, normalized entropy (logloss over the entropy of the observed CTR) and calibration."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    ctr = float(labels.mean()) if len(labels) else float("nan")
    entropy = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
    loss = logloss(labels, probs) if len(labels) else float("nan")
    predicted = float(probs.mean()) if len(probs) else float("nan")
    return {
        "rows": int(len(labels)),
        "positives": int(labels.sum()),
        "auc": _num(auc(labels, probs)),
        "logloss": _num(loss),
        "normalized_entropy": _num(loss / entropy),
        "calibration": {
            "predicted_ctr": _num(predicted),
            "observed_ctr": _num(ctr),
            "ratio": _num(predicted / ctr) if ctr else None,
        },
    }


def _num(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def slice_metrics(
    labels: np.ndarray, probs: np.ndarray, slices: pd.DataFrame, top: int = 10, min_rows: int = 50
) -> dict[str, list[dict[str, Any]]]:
    """Per column: the metrics of its ``top`` most frequent values with at least ``min_rows`` rows."""
    out = {}
    for column in slices.columns:
        values = slices[column].astype("string").fillna("(missing)").to_numpy()
        kept, counts = np.unique(values, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        out[column] = [
            {"value": str(kept[i]), **metrics(labels[values == kept[i]], probs[values == kept[i]])}
            for i in order
            if counts[i] >= min_rows
        ]
    return out


def compare(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Model b minus model a on the same rows: AUC and logloss differences with bootstrap confidence intervals."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs = {"auc": [], "logloss": []}
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        y = labels[rows]
        if y.min() == y.max():
            continue
        diffs["auc"].append(auc(y, b[rows]) - auc(y, a[rows]))
        diffs["logloss"].append(logloss(y, b[rows]) - logloss(y, a[rows]))
    tail = (1 - confidence) / 2 * 100
    point = {"auc": auc(labels, b) - auc(labels, a), "logloss": logloss(labels, b) - logloss(labels, a)}
    return {
        k: {
            "difference": float(point[k]),
            "ci": [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else None,
            "confidence": confidence,
            "resamples": len(v),
        }
        for k, v in diffs.items()
    }


def evaluate(scorer: Scorer, rows: Labelled, other: Scorer | None = None) -> dict[str, Any]:
    """The report of ``recops evaluate``: metrics, slices, and the comparison with ``other`` when given."""
    probs = scorer.score(rows.features)
    report = {
        **metrics(rows.labels, probs),
        "model": scorer.description,
        "data": rows.source,
        "slices": slice_metrics(rows.labels, probs, rows.slices),
    }
    if scorer.versions:
        report["served_versions"] = sorted(scorer.versions)
    if other is not None:
        other_probs = other.score(rows.features)
        report["other"] = {**metrics(rows.labels, other_probs), "model": other.description}
        report["comparison"] = compare(rows.labels, other_probs, probs)
    return report
