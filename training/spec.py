"""Column specification of raw data and the preprocessing configuration (plain value types)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recops.errors import RecopsError

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
HASH_SCHEME = "fmix64-words"  # names recops.training.hashing's function
MAX_TABLE_SIZE = 1 << 32  # its bucket mapping works on 32 bits


@dataclass(frozen=True)
class ColumnSpec:
    """Which raw columns are the label, dense, categorical and multi-hot list features.

    ``format`` is ``criteo`` (tab-separated, no header, columns in spec order), ``csv`` (header row)
    or ``parquet``; text files may be gzip-compressed. Multi-hot columns hold ``separator``-joined values
    (or lists in Parquet) and are padded/truncated to ``multi_hot[name]`` ids.

    The label is a click, 0 or 1, unless both rating thresholds are set: then it is an explicit rating
    turned into a click, ``label >= label_positive_min`` -> 1 and ``label <= label_negative_max`` -> 0
    (``label_negative_max < label_positive_min``); a rating in between is rejected and counted as
    ``label_between_thresholds``, a missing or non-numeric one as ``bad_label``. In YAML::

        label: rating
        label_positive_min: 4
        label_negative_max: 2
    """

    label: str = "label"
    dense: tuple[str, ...] = CRITEO_DENSE
    sparse: tuple[str, ...] = CRITEO_SPARSE
    multi_hot: dict[str, int] = field(default_factory=dict)
    format: str = "criteo"
    separator: str = "|"
    label_positive_min: float | None = None
    label_negative_max: float | None = None

    def __post_init__(self) -> None:
        if self.format not in ("criteo", "csv", "parquet"):
            raise RecopsError(f"column spec: format {self.format!r} is not one of criteo, csv, parquet")
        names = self.columns
        if len(set(names)) != len(names):
            raise RecopsError(f"column spec: duplicate column names in {names}")
        for name, max_len in self.multi_hot.items():
            if int(max_len) < 1:
                raise RecopsError(f"column spec: multi_hot[{name!r}] must be a max length >= 1, got {max_len}")
        if not self.separator:
            raise RecopsError("column spec: separator must be a non-empty string")
        self._check_thresholds()

    def _check_thresholds(self) -> None:
        low, high = self.label_negative_max, self.label_positive_min
        if low is None and high is None:
            return
        if low is None or high is None:
            raise RecopsError(
                "column spec: set both label_positive_min and label_negative_max (ratings), or neither "
                f"(0/1 clicks); got label_positive_min={high}, label_negative_max={low}"
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise RecopsError(
                f"column spec: rating thresholds must be finite numbers, got "
                f"label_positive_min={high!r}, label_negative_max={low!r}"
            )
        if not low < high:
            raise RecopsError(f"column spec: label_negative_max ({low}) must be below label_positive_min ({high})")

    @classmethod
    def criteo(cls) -> ColumnSpec:
        return cls()

    @property
    def columns(self) -> tuple[str, ...]:
        """Raw column order: label, dense, categorical, multi-hot."""
        return (self.label, *self.dense, *self.sparse, *self.multi_hot)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Embedding-table order used by the model: categorical then multi-hot."""
        return (*self.sparse, *self.multi_hot)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "column spec") -> ColumnSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecopsError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        data = dict(data)
        for key in ("dense", "sparse"):
            if key in data:
                data[key] = _names(data[key], key, source)
        if "multi_hot" in data:
            data["multi_hot"] = _lengths(data["multi_hot"], source)
        for key in ("label", "format", "separator"):
            if key in data and not isinstance(data[key], str):
                raise RecopsError(f"{source}: {key} must be a string, got {data[key]!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ColumnSpec:
        """Read a spec from YAML or JSON."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RecopsError(f"column spec {path}: cannot read it ({exc}); pass a YAML/JSON file") from exc
        if not isinstance(data, dict):
            raise RecopsError(f"column spec {path}: expected a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, source=f"column spec {path}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Feature preprocessing shared by training and serving.

    Categorical values are hashed into ``table_size`` buckets (``table_sizes`` overrides per
    feature); id 0 is reserved for a missing value. With ``min_frequency > 0`` a vocabulary of
    values seen at least that often in training data is used instead: id 1 is out-of-vocabulary.
    The hash is ``recops.training.hashing``'s, keyed by ``hash_key``; ``hash_scheme`` names it, so a
    config saved by a recops with another hash function is refused instead of silently re-hashed.
    """

    table_size: int = 100_000
    table_sizes: dict[str, int] = field(default_factory=dict)
    min_frequency: int = 0
    hash_key: str = "recops-hash-v001"
    hash_scheme: str = HASH_SCHEME

    def __post_init__(self) -> None:
        if len(self.hash_key.encode()) != 16:
            raise RecopsError("preprocess config: hash_key must be exactly 16 bytes")
        if self.hash_scheme != HASH_SCHEME:
            raise RecopsError(
                f"preprocess config: hash scheme {self.hash_scheme!r} is not this recops' "
                f"{HASH_SCHEME!r}; re-run `recops data ingest` and retrain the model"
            )
        for name, size in {"table_size": self.table_size, **self.table_sizes}.items():
            if not 2 <= int(size) <= MAX_TABLE_SIZE:
                raise RecopsError(f"preprocess config: table size for {name} must be in [2, 2**32], got {size}")

    def size_of(self, feature: str) -> int:
        return int(self.table_sizes.get(feature, self.table_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        """A saved config; one without ``hash_scheme`` predates it (pandas' SipHash ids)."""
        return cls(**{"hash_scheme": "pandas-siphash", **data})


def _names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecopsError(f"{source}: {key} must be a list of column names, e.g. {key}: [a, b]; got {value!r}")
    return tuple(value)


def _lengths(value: Any, source: str) -> dict[str, int]:
    """``multi_hot``: column -> the most ids kept per row."""
    if isinstance(value, (list, tuple)):
        example = ", ".join(f"{v}: 5" for v in value[:2]) if all(isinstance(v, str) for v in value) else "genres: 5"
        raise RecopsError(
            f"{source}: multi_hot maps each list column to the most ids kept per row, e.g. "
            f"multi_hot: {{{example}}}; got a list {value!r}"
        )
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise RecopsError(
            f"{source}: multi_hot must map column names to integers, e.g. multi_hot: {{genres: 5}}; got {value!r}"
        )
    return dict(value)


def canonical_json(data: Any) -> str:
    """Stable JSON used for hashing configs into version ids."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
