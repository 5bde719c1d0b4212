"""The one preprocessing function shared by training and serving (no train/serve skew)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.training.spec import ColumnSpec, PreprocessConfig

MISSING_ID = 0
OOV_ID = 1
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Features:
    """Model-ready arrays for N rows."""

    dense: np.ndarray  # float32 [N, D]
    sparse: np.ndarray  # int64 [N, S]; 0 = missing
    multi: dict[str, np.ndarray] = field(default_factory=dict)  # int64 [N, L], -1 = padding
    label: np.ndarray | None = None  # float32 [N]

    def __len__(self) -> int:
        return len(self.dense)

    def take(self, index: np.ndarray | slice) -> Features:
        return Features(
            dense=self.dense[index],
            sparse=self.sparse[index],
            multi={k: v[index] for k, v in self.multi.items()},
            label=None if self.label is None else self.label[index],
        )

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        first = parts[0]
        return cls(
            dense=np.concatenate([p.dense for p in parts]),
            sparse=np.concatenate([p.sparse for p in parts]),
            multi={k: np.concatenate([p.multi[k] for p in parts]) for k in first.multi},
            label=None if first.label is None else np.concatenate([p.label for p in parts]),
        )


def transform_dense(values: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)), missing (NaN) -> 0."""
    out = np.log1p(np.maximum(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0))
    return out.astype(np.float32)


def _salt(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") | 1)


def _hash(values: np.ndarray, feature: str, key: str) -> np.ndarray:
    """Stable 64-bit hash of string values, salted per feature."""
    h = pd.util.hash_array(values.astype(object), hash_key=key, categorize=True)
    with np.errstate(over="ignore"):
        h = (h ^ _salt(feature)) * _MIX
        return h ^ (h >> np.uint64(31))


def _is_missing(values: pd.Series) -> np.ndarray:
    return (values.isna() | (values.astype(str) == "")).to_numpy()


class Preprocessor:
    """Turns a raw frame (spec columns) into :class:`Features`; scikit-learn style ``fit``/``transform``.

    ``fit`` is only needed when ``config.min_frequency > 0`` (it builds the vocabularies).
    """

    def __init__(self, spec: ColumnSpec, config: PreprocessConfig, vocabularies: dict[str, list[str]] | None = None):
        self.spec = spec
        self.config = config
        self.vocabularies = vocabularies or {}
        self._indexes = {name: pd.Index(values) for name, values in self.vocabularies.items()}

    @property
    def table_sizes(self) -> dict[str, int]:
        return {name: self.config.size_of(name) for name in self.spec.feature_names}

    def fit(self, frames: Any) -> Preprocessor:
        """Build frequency-threshold vocabularies from one frame or an iterable of frames."""
        if self.config.min_frequency <= 0:
            return self
        frames = [frames] if isinstance(frames, pd.DataFrame) else frames
        counts: dict[str, pd.Series] = {}
        for frame in frames:
            for name in self.spec.sparse:
                vc = frame[name].dropna().astype(str).value_counts()
                counts[name] = vc if name not in counts else counts[name].add(vc, fill_value=0)
        vocab = {}
        for name, vc in counts.items():
            kept = vc[vc >= self.config.min_frequency].sort_values(ascending=False, kind="stable")
            vocab[name] = [v for v in kept.index[: self.config.size_of(name) - 2] if v != ""]
        return Preprocessor(self.spec, self.config, vocab)

    def ids(self, name: str, values: pd.Series) -> np.ndarray:
        """Categorical values of one feature -> int64 ids in [0, table size)."""
        missing = _is_missing(values)
        raw = values.astype(str).to_numpy()
        if name in self._indexes:
            ids = self._indexes[name].get_indexer(raw).astype(np.int64)
            ids = np.where(ids < 0, OOV_ID, ids + 2)
        else:
            buckets = np.uint64(self.config.size_of(name) - 1)
            ids = (_hash(raw, name, self.config.hash_key) % buckets).astype(np.int64) + 1
        ids[missing] = MISSING_ID
        return ids

    def _multi(self, name: str, values: pd.Series) -> np.ndarray:
        max_len = int(self.spec.multi_hot[name])
        lists = values.map(_as_list(self.spec.separator))
        lengths = lists.map(len).to_numpy()
        flat = lists.explode()
        flat = flat[flat.notna()]
        ids = self.ids(name, flat.astype(str))
        rows = np.repeat(np.arange(len(values)), lengths)
        position = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out = np.full((len(values), max_len), -1, dtype=np.int64)
        keep = position < max_len
        out[rows[keep], position[keep]] = ids[keep]
        out[lengths == 0, 0] = MISSING_ID
        return out

    def transform(self, frame: pd.DataFrame) -> Features:
        missing = [c for c in (*self.spec.dense, *self.spec.sparse, *self.spec.multi_hot) if c not in frame]
        if missing:
            raise RecopsError(f"preprocess: input frame lacks columns {missing}; it must have the spec's columns")
        dense = transform_dense(frame[list(self.spec.dense)].to_numpy(dtype=np.float64, na_value=np.nan))
        sparse = (
            np.stack([self.ids(n, frame[n]) for n in self.spec.sparse], axis=1)
            if self.spec.sparse
            else np.zeros((len(frame), 0), np.int64)
        )
        multi = {n: self._multi(n, frame[n]) for n in self.spec.multi_hot}
        label = frame[self.spec.label].to_numpy(np.float32) if self.spec.label in frame else None
        return Features(dense=dense, sparse=sparse, multi=multi, label=label)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "config": self.config.to_dict(), "vocabularies": self.vocabularies}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessor:
        return cls(
            ColumnSpec.from_dict(data["spec"]), PreprocessConfig.from_dict(data["config"]), data.get("vocabularies")
        )


def _as_list(separator: str):
    def split(value: Any) -> list:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return []
        if isinstance(value, str):
            return [v for v in value.split(separator) if v != ""]
        return [str(v) for v in value]

    return split
