"""Column specification of raw data and the preprocessing configuration (plain value types)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recops.errors import RecopsError

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))


@dataclass(frozen=True)
class ColumnSpec:
    """Which raw columns are the label, dense, categorical and multi-hot list features.

    ``format`` is ``criteo`` (tab-separated, no header, columns in spec order), ``csv`` (header row)
    or ``parquet``. Multi-hot columns hold ``separator``-joined values (or lists in Parquet) and are
    padded/truncated to ``multi_hot[name]`` ids.
    """

    label: str = "label"
    dense: tuple[str, ...] = CRITEO_DENSE
    sparse: tuple[str, ...] = CRITEO_SPARSE
    multi_hot: dict[str, int] = field(default_factory=dict)
    format: str = "criteo"
    separator: str = "|"

    def __post_init__(self) -> None:
        if self.format not in ("criteo", "csv", "parquet"):
            raise RecopsError(f"column spec: format {self.format!r} is not one of criteo, csv, parquet")
        names = self.columns
        if len(set(names)) != len(names):
            raise RecopsError(f"column spec: duplicate column names in {names}")
        for name, max_len in self.multi_hot.items():
            if int(max_len) < 1:
                raise RecopsError(f"column spec: multi_hot[{name!r}] must be a max length >= 1, got {max_len}")

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
                data[key] = tuple(data[key])
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
    """

    table_size: int = 100_000
    table_sizes: dict[str, int] = field(default_factory=dict)
    min_frequency: int = 0
    hash_key: str = "recops-hash-v001"

    def __post_init__(self) -> None:
        if len(self.hash_key.encode()) != 16:
            raise RecopsError("preprocess config: hash_key must be exactly 16 bytes")
        for name, size in {"table_size": self.table_size, **self.table_sizes}.items():
            if int(size) < 2:
                raise RecopsError(f"preprocess config: table size for {name} must be >= 2, got {size}")

    def size_of(self, feature: str) -> int:
        return int(self.table_sizes.get(feature, self.table_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(**data)


def canonical_json(data: Any) -> str:
    """Stable JSON used for hashing configs into version ids."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
