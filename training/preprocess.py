"""The one preprocessing function shared by training and serving (no train/serve skew).

Categorical ids are ``recops.training.hashing``'s keyed hash of the value's UTF-8 bytes, bucketed into the
feature's table (0 = missing); dense values become ``log1p(max(x, 0))`` with missing and non-finite -> 0.
Everything runs on Arrow arrays: a frame from ``recops.training.readers`` is used without copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recops.errors import RecopsError
from recops.training.columns import as_arrow, as_strings, present, to_float
from recops.training.hashing import bucket, feature_seed, hash_values
from recops.training.spec import ColumnSpec, PreprocessConfig

MISSING_ID = 0
OOV_ID = 1
MERGE_VALUES = 1 << 16  # up to this many categorical values, all features are hashed in one pass


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
    """log(1 + max(x, 0)); missing (NaN) and non-finite values -> 0."""
    values = np.asarray(values, dtype=np.float64)
    out = np.where(np.isfinite(values), values, 0.0)
    np.maximum(out, 0.0, out=out)
    np.log1p(out, out=out)
    return out.astype(np.float32)


def dense_values(
    frame: pd.DataFrame | Mapping[str, Any], names: tuple[str, ...], rows: int | None = None
) -> np.ndarray:
    """float64 [N, D] of raw dense columns (numbers or numeric text), NaN = missing (null, empty, non-finite)."""
    if isinstance(frame, pd.DataFrame) and all(frame[n].dtype.kind == "f" for n in names):
        values = frame[list(names)].to_numpy(dtype=np.float64, na_value=np.nan)
        return np.where(np.isfinite(values), values, np.nan)
    out = np.empty((len(frame) if rows is None else rows, len(names)))
    for j, name in enumerate(names):
        column = frame[name]
        if isinstance(column, np.ndarray) and column.dtype.kind == "f":  # numbers as they come (raw FP32 tensors)
            out[:, j] = column.reshape(-1)
            continue
        out[:, j], bad = to_float(as_arrow(column))
        if bad.any():
            where = np.flatnonzero(bad)
            raise RecopsError(
                f"preprocess: dense column {name} holds non-numbers at rows {where[:5].tolist()} "
                f"(e.g. {as_arrow(frame[name])[int(where[0])]!r}); send numbers, or empty for missing"
            )
    out[~np.isfinite(out)] = np.nan
    return out


class Preprocessor:
    """Turns a raw frame (spec columns) into :class:`Features`; scikit-learn style ``fit``/``transform``.

    ``fit`` is only needed when ``config.min_frequency > 0`` (it builds the vocabularies). Columns may be
    pandas (object, ``str``, Arrow-backed) or numeric; the rules are ``recops.training.columns``'.
    """

    def __init__(self, spec: ColumnSpec, config: PreprocessConfig, vocabularies: dict[str, list[str]] | None = None):
        self.spec = spec
        self.config = config
        self.vocabularies = vocabularies or {}
        self._vocab = {name: pa.array(values, pa.large_binary()) for name, values in self.vocabularies.items()}
        self._seeds = {name: feature_seed(name, config.hash_key) for name in spec.feature_names}

    @property
    def table_sizes(self) -> dict[str, int]:
        return {name: self.config.size_of(name) for name in self.spec.feature_names}

    def fit(self, frames: Any) -> Preprocessor:
        """Build frequency-threshold vocabularies from one frame or an iterable of frames: the values seen at
        least ``min_frequency`` times, most frequent first (ties by value)."""
        return self.fit_counts([self.count(frames)])

    def count(self, frames: Any) -> dict[str, pa.Table]:
        """Value counts (``value``, ``count``) of every sparse feature in one frame or an iterable of frames:
        what ``fit_counts`` merges, whichever process counted which frames."""
        if self.config.min_frequency <= 0:
            return {}
        frames = [frames] if isinstance(frames, pd.DataFrame) else frames
        counts: dict[str, pa.Table] = {}
        for frame in frames:
            for name in self.spec.sparse:
                values = _categorical(frame[name]).cast(pa.large_binary())
                new = pc.value_counts(values.filter(pa.array(present(values))))
                table = pa.table({"value": new.field("values"), "count": new.field("counts")})
                counts[name] = _merged(counts[name], table) if name in counts else table
        return counts

    def fit_counts(self, parts: Any) -> Preprocessor:
        """The vocabularies of the merged counts ``parts`` (an iterable of ``count`` results)."""
        if self.config.min_frequency <= 0:
            return self
        counts: dict[str, pa.Table] = {}
        for part in parts:
            for name, table in part.items():
                counts[name] = _merged(counts[name], table) if name in counts else table
        vocab = {}
        for name, table in counts.items():
            kept = table.filter(pc.greater_equal(table["count"], self.config.min_frequency))
            order = pc.sort_indices(kept, [("count", "descending"), ("value", "ascending")])
            top = kept["value"].take(order[: self.config.size_of(name) - 2])
            vocab[name] = [v.decode() for v in top.to_pylist()]
        return Preprocessor(self.spec, self.config, vocab)

    def ids(self, name: str, values: pd.Series | pa.Array) -> np.ndarray:
        """Categorical values of one feature -> int64 ids in [0, table size); 0 = missing (null or empty)."""
        array = _categorical(values)
        if name in self._vocab:
            index = pc.index_in(array.cast(pa.large_binary()), value_set=self._vocab[name])
            index = index.to_numpy(zero_copy_only=False)  # float, NaN where out of vocabulary
            ids = np.where(np.isnan(index), OOV_ID, np.nan_to_num(index) + 2).astype(np.int64)
        else:
            ids = bucket(hash_values(array, self._seeds[name]), self.config.size_of(name))
        ids[~present(array)] = MISSING_ID
        return ids

    def _multi(self, name: str, values: pd.Series) -> np.ndarray:
        """[N, max_len] ids of a list feature: tokens in order, -1 padding; a row without a token -> [0, -1, ...]."""
        array = as_arrow(values)
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
            array = pc.split_pattern(_categorical(array), self.spec.separator)
        tokens = _categorical(pc.list_flatten(array))
        rows = pc.list_parent_indices(array).to_numpy()
        keep = present(tokens)
        ids, rows = self.ids(name, tokens.filter(pa.array(keep))), rows[keep]
        position = np.arange(len(rows)) - np.searchsorted(rows, rows)
        out = np.full((len(array), int(self.spec.multi_hot[name])), -1, dtype=np.int64)
        fits = position < out.shape[1]
        out[rows[fits], position[fits]] = ids[fits]
        out[np.bincount(rows, minlength=len(array)) == 0, 0] = MISSING_ID
        return out

    def transform(self, frame: pd.DataFrame | Mapping[str, Any]) -> Features:
        """Features of raw rows: a frame, or a mapping of column name -> values (Arrow arrays, numpy arrays or
        pandas Series, as the raw-feature model passes a request's tensors)."""
        missing = [c for c in (*self.spec.dense, *self.spec.sparse, *self.spec.multi_hot) if c not in frame]
        if missing:
            raise RecopsError(f"preprocess: input frame lacks columns {missing}; it must have the spec's columns")
        rows = len(frame) if isinstance(frame, pd.DataFrame) else len(next(iter(frame.values()), ()))
        dense = transform_dense(dense_values(frame, self.spec.dense, rows))
        multi = {n: self._multi(n, frame[n]) for n in self.spec.multi_hot}
        label = np.asarray(frame[self.spec.label], np.float32) if self.spec.label in frame else None
        return Features(dense=dense, sparse=self._sparse(frame, rows), multi=multi, label=label)

    def _sparse(self, frame: pd.DataFrame | Mapping[str, Any], rows: int) -> np.ndarray:
        """[N, S] ids; hashed features of a small batch in one pass over all their values (per-value seeds)."""
        names = self.spec.sparse
        if names and rows * len(names) <= MERGE_VALUES and not any(n in self._vocab for n in names):
            merged = _concat([_categorical(frame[n]) for n in names])
            seeds = np.repeat(np.array([self._seeds[n] for n in names], np.uint64), rows)
            sizes = np.repeat(np.array([self.config.size_of(n) for n in names], np.int64), rows)
            ids = bucket(hash_values(merged, seeds), sizes)
            ids[~present(merged)] = MISSING_ID
            return np.ascontiguousarray(ids.reshape(len(names), rows).T)
        sparse = np.zeros((rows, len(names)), np.int64)
        for j, name in enumerate(names):
            sparse[:, j] = self.ids(name, frame[name])
        return sparse

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "config": self.config.to_dict(), "vocabularies": self.vocabularies}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessor:
        spec, config = ColumnSpec.from_dict(data["spec"]), PreprocessConfig.from_dict(data["config"])
        return cls(spec, config, data.get("vocabularies"))


def _concat(arrays: list[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """One array of the values of ``arrays`` (cast to a common string type only where they differ)."""
    arrays = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    kind = arrays[0].type if all(a.type == arrays[0].type for a in arrays) else pa.large_binary()
    return pa.concat_arrays([a if a.type == kind else a.cast(kind) for a in arrays])


def _merged(a: pa.Table, b: pa.Table) -> pa.Table:
    """Two value-count tables as one."""
    table = pa.concat_tables([a, b]).group_by("value").aggregate([("count", "sum")])
    return table.rename_columns(["value", "count"])


def _categorical(values: pd.Series | pa.Array) -> pa.Array:
    """Values of a categorical as one string/binary Arrow array (numbers as their text)."""
    return as_strings(as_arrow(values))
