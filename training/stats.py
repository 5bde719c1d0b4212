"""Reference statistics of a dataset, the baseline that drift detection compares live data with.

Computed from a uniform sample (at most ``max_rows`` rows) of validated raw rows:

- dense features, on the model's transformed value ``log1p(max(x, 0))`` excluding missing values:
  missing rate, mean/std, quantiles, reference-quantile bin edges and the bin fractions;
- categorical features: missing rate, distinct values in the sample, the ``top_k`` most frequent
  values with their fractions of the non-missing values, and the ``other`` fraction. Multi-hot
  features are treated as categoricals over their tokens (a row with no token is missing).

``save_reference`` writes ``stats.json`` (JSON, human-readable) and ``reference_sample.npz`` (the
transformed dense sample, NaN = missing, used for exact two-sample KS tests) atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recops.errors import RecopsError
from recops.files import atomic_path, write_json_atomic
from recops.training.preprocess import dense_values, transform_dense
from recops.training.spec import ColumnSpec

STATS_FILE = "stats.json"
SAMPLE_FILE = "reference_sample.npz"
FORMAT_VERSION = 1
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass
class Reference:
    """Loaded reference statistics plus the sorted dense sample per feature."""

    spec: ColumnSpec
    stats: dict[str, Any]
    dense_sorted: dict[str, np.ndarray]  # feature -> sorted non-missing transformed values (float32)

    @property
    def rows(self) -> int:
        return int(self.stats["rows"])

    @property
    def categorical(self) -> tuple[str, ...]:
        return (*self.spec.sparse, *self.spec.multi_hot)


def dense_matrix(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    """Transformed dense values float32 [N, D] with NaN where the raw value is missing (null, empty, non-finite)."""
    raw = dense_values(frame, names)
    out = transform_dense(raw)
    out[np.isnan(raw)] = np.nan
    return out


def _as_arrow(values: pd.Series) -> pa.Array:
    """A column as one Arrow array (zero-copy for Arrow-backed pandas strings)."""
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise RecopsError(
            f"column {values.name}: mixed value types ({exc}); categorical values must be strings"
        ) from exc
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def categorical_values(frame: pd.DataFrame, name: str, spec: ColumnSpec) -> tuple[pa.Array, int]:
    """Present values of one categorical as Arrow strings (tokens for multi-hot), and the number of
    rows missing it (null or empty; for multi-hot: no non-empty token)."""
    array = _as_arrow(frame[name])
    if name in spec.multi_hot:
        lists = (
            pc.split_pattern(array.cast(pa.large_string()), spec.separator)
            if not pa.types.is_list(array.type)
            else array
        )
        tokens, rows = pc.list_flatten(lists).cast(pa.large_string()), pc.list_parent_indices(lists)
        keep = pc.and_(pc.is_valid(tokens), pc.not_equal(tokens, "")).fill_null(False)
        present_rows = len(pc.unique(rows.filter(keep)))
        return tokens.filter(keep), len(array) - present_rows
    array = array.cast(pa.large_string())
    keep = pc.and_(pc.is_valid(array), pc.not_equal(array, "")).fill_null(False)
    return array.filter(keep), len(array) - int(pc.sum(keep).as_py() or 0)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _dense_stats(values: np.ndarray, bins: int) -> dict[str, Any]:
    """Statistics of one dense column (transformed, NaN = missing)."""
    present = np.sort(values[~np.isnan(values)]).astype(np.float64)
    stats: dict[str, Any] = {
        "count": int(present.size),
        "missing_rate": _finite(1 - present.size / max(values.size, 1)),
    }
    if present.size == 0:
        return {**stats, "mean": None, "std": None, "quantiles": {}, "edges": [], "fractions": []}
    edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf"))
    edges = edges[edges > present[0]]  # an edge at the minimum would leave the first bin empty
    counts = np.diff(np.concatenate([[0], np.searchsorted(present, edges, side="left"), [present.size]]))
    return {
        **stats,
        "mean": float(present.mean()),
        "std": float(present.std()),
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(present, QUANTILES))},
        "edges": edges.tolist(),
        "fractions": (counts / present.size).tolist(),
    }


def _categorical_stats(values: pa.Array, missing: int, rows: int, top_k: int) -> dict[str, Any]:
    counts = pc.value_counts(values)
    order = np.argsort(-counts.field("counts").to_numpy(), kind="stable")
    total = len(values)
    top = order[:top_k]
    top_values = counts.field("values").take(pa.array(top)).to_pylist()
    top_counts = counts.field("counts").to_numpy()[top]
    return {
        "count": total,
        "missing_rate": missing / max(rows, 1),
        "distinct": len(counts),
        "top": [[v, int(c) / total] for v, c in zip(top_values, top_counts)],
        "other": float(1 - top_counts.sum() / total) if total else 0.0,
    }


def reference_stats(frame: pd.DataFrame, spec: ColumnSpec, bins: int = 10, top_k: int = 100) -> dict[str, Any]:
    """JSON-able reference statistics of ``frame`` (validated raw rows with the spec's columns)."""
    missing = [c for c in (*spec.dense, *spec.sparse, *spec.multi_hot) if c not in frame]
    if missing:
        raise RecopsError(f"reference stats: frame lacks columns {missing}; it must have the spec's columns")
    if len(frame) == 0:
        raise RecopsError("reference stats: the sample has no rows; pass a non-empty validated sample")
    dense = dense_matrix(frame, spec.dense)
    stats: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "rows": int(len(frame)),
        "bins": bins,
        "top_k": top_k,
        "schema": spec.to_dict(),
        "dense": {name: _dense_stats(dense[:, j], bins) for j, name in enumerate(spec.dense)},
        "categorical": {},
    }
    for name in (*spec.sparse, *spec.multi_hot):
        values, n_missing = categorical_values(frame, name, spec)
        stats["categorical"][name] = _categorical_stats(values, n_missing, len(frame), top_k)
    return stats


def save_reference(
    dataset_dir: Path, frame: pd.DataFrame, spec: ColumnSpec, max_rows: int = 200_000, seed: int = 0
) -> None:
    """Write ``stats.json`` and ``reference_sample.npz`` for ``frame`` (uniformly subsampled to ``max_rows``)."""
    dataset_dir = Path(dataset_dir)
    if len(frame) > max_rows:
        frame = frame.sample(max_rows, random_state=seed)
    stats = reference_stats(frame, spec)
    dense = dense_matrix(frame, spec.dense)
    with atomic_path(dataset_dir / SAMPLE_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, dense=dense)
    write_json_atomic(dataset_dir / STATS_FILE, stats)


def load_reference(dataset_dir: Path) -> Reference:
    """Open the reference written by :func:`save_reference` in ``dataset_dir``."""
    dataset_dir = Path(dataset_dir)
    stats_path, sample_path = dataset_dir / STATS_FILE, dataset_dir / SAMPLE_FILE
    if not stats_path.is_file() or not sample_path.is_file():
        raise RecopsError(
            f"reference {dataset_dir}: needs {STATS_FILE} and {SAMPLE_FILE}; pass a processed dataset "
            "directory (recops data ingest writes them)"
        )
    try:
        stats = json.loads(stats_path.read_text())
        with np.load(sample_path) as npz:
            dense = npz["dense"]
    except (OSError, ValueError, KeyError) as exc:
        raise RecopsError(f"reference {dataset_dir}: cannot read it ({exc}); re-run the ingest") from exc
    if stats.get("format_version") != FORMAT_VERSION:
        raise RecopsError(
            f"reference {stats_path}: format_version {stats.get('format_version')} is not "
            f"{FORMAT_VERSION}; re-run the ingest with this recops version"
        )
    spec = ColumnSpec.from_dict(stats["schema"], source=str(stats_path))
    if dense.shape != (stats["rows"], len(spec.dense)):
        raise RecopsError(
            f"reference {dataset_dir}: {SAMPLE_FILE} shape {dense.shape} does not match "
            f"{STATS_FILE} ({stats['rows']} rows, {len(spec.dense)} dense); re-run the ingest"
        )
    sorted_ = {name: np.sort(dense[~np.isnan(dense[:, j]), j]) for j, name in enumerate(spec.dense)}
    return Reference(spec=spec, stats=stats, dense_sorted=sorted_)
