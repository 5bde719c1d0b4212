"""Raw columns as Triton tensors: the raw-feature model's names and inputs, a request's tensors decoded into the
frame ``Preprocessor.transform`` takes (errors name the column and the fix), a frame encoded for a request, and
random raw rows for probes.

Input contract of the raw-feature model (``recops.serving.raw_model``), B = batch, one input per raw column of the
column spec, each [B, 1]:

- dense columns: FP32 (NaN = missing) or BYTES (decimal text, empty = missing), as the model's ``raw_dense`` says
- categorical columns: BYTES (UTF-8, empty = missing)
- multi-hot columns: BYTES, the values joined by the spec's separator (e.g. ``"3|17"``; empty = none)

Outputs: the tensor-level model's outputs (``probability`` [B, 1]) and ``model_version`` INT64 [B, 1], the version
that answered each row. Request parameters: ``version`` (ask for one version, as a number) and ``key`` (the routing
key; default the request id, else a random one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from recops.errors import RecopsError
from recops.serving.onnx_model import TensorSpec
from recops.serving.repository import CONFIG_FILE, ModelRepository
from recops.training.columns import to_float
from recops.training.spec import ColumnSpec

MODEL_VERSION = "model_version"  # output: the version that answered each row
VERSION_PARAMETER, KEY_PARAMETER = "version", "key"


class RawInputError(RecopsError):
    """A raw-feature request the preprocessing step cannot use; the message names the column and the fix."""


@dataclass(frozen=True)
class RawModelNames:
    """The Triton models serving tensor-level model ``model`` on raw features: the ensemble clients call (``raw``)
    and its two steps."""

    model: str

    @property
    def raw(self) -> str:
        return f"{self.model}_raw"

    @property
    def preprocess(self) -> str:
        return f"{self.model}_raw_preprocess"

    @property
    def score(self) -> str:
        return f"{self.model}_raw_score"


def raw_model_of(repo: ModelRepository, name: str) -> str | None:
    """The raw-feature model's name if ``repo`` holds one for tensor-level model ``name``."""
    raw = RawModelNames(name).raw
    return raw if (repo.model_dir(raw) / CONFIG_FILE).is_file() else None


def raw_columns(spec: ColumnSpec, dense_dtype: str) -> tuple[TensorSpec, ...]:
    """The raw-feature model's inputs (batch first): dense columns as ``dense_dtype``, the others as BYTES."""
    dense = tuple(TensorSpec(name, dense_dtype, (-1, 1)) for name in spec.dense)
    return dense + tuple(TensorSpec(name, "BYTES", (-1, 1)) for name in (*spec.sparse, *spec.multi_hot))


# ---- server side: a request's tensors -> the Preprocessor's frame -------------------------------------------------
RawColumns = dict[str, "np.ndarray | pa.Array"]  # column -> float64 numbers or Arrow UTF-8 text


def raw_frame(spec: ColumnSpec, tensors: Mapping[str, np.ndarray]) -> RawColumns:
    """The columns ``Preprocessor.transform`` takes, from one request's raw tensors (each [B, 1] or [B]): dense as
    float64 (NaN = missing), text as Arrow arrays (no pandas, no per-value Python objects)."""
    names = (*spec.dense, *spec.sparse, *spec.multi_hot)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RawInputError(
            f"columns {', '.join(missing)} are missing: send one input per column ({', '.join(names)}), with an "
            "empty string (BYTES) or NaN (FP32) where a value is missing"
        )
    data = {name: _numbers(name, tensors[name]) for name in spec.dense}
    data |= {name: _utf8(name, tensors[name]) for name in (*spec.sparse, *spec.multi_hot)}
    rows = {name: len(values) for name, values in data.items()}
    if len(set(rows.values())) > 1:
        raise RawInputError(f"columns have different row counts {rows}: send every column with the same rows")
    return data


def raw_rows(columns: RawColumns) -> int:
    return len(next(iter(columns.values()), ()))


def merge_raw(parts: Sequence[RawColumns]) -> RawColumns:
    """The rows of several requests' columns, one after the other."""
    return {
        name: np.concatenate([p[name] for p in parts])
        if isinstance(parts[0][name], np.ndarray)
        else pa.concat_arrays([p[name] for p in parts])
        for name in parts[0]
    }


def _utf8(name: str, tensor: np.ndarray) -> pa.Array:
    values = np.asarray(tensor).reshape(-1)
    if values.dtype != object:
        raise RawInputError(f"column {name} is {values.dtype}: send it as BYTES (UTF-8 text)")
    try:
        return pa.array(values, type=pa.binary()).cast(pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        row = next(i for i, v in enumerate(values) if not _is_utf8(v))
        raise RawInputError(f"column {name}: row {row} is not UTF-8 text; send text as UTF-8") from None


def _is_utf8(value: object) -> bool:
    if not isinstance(value, bytes):
        return isinstance(value, str)
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _numbers(name: str, tensor: np.ndarray) -> np.ndarray:
    """float64 values of a dense column (NaN = missing), from FP32/FP64 or from decimal text (empty = missing),
    read by the raw-data reader's rules (``recops.training.columns.to_float``)."""
    values = np.asarray(tensor).reshape(-1)
    if values.dtype.kind == "f":
        return values.astype(np.float64)
    if values.dtype != object:
        raise RawInputError(f"column {name} is {values.dtype}: send it as FP32 numbers or BYTES decimal text")
    numbers, bad = to_float(_utf8(name, values))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise RawInputError(
            f"column {name}: {_shown(values[row])!r} (row {row}) is not a number; send a "
            "decimal number such as 3 or 0.25, or an empty string for a missing value"
        )
    return numbers


def _shown(value: object) -> str:
    return (value.decode(errors="replace") if isinstance(value, bytes) else str(value))[:40]


# ---- client side: a frame -> a request's tensors ------------------------------------------------------------------
def raw_inputs(frame: pd.DataFrame, columns: Sequence[TensorSpec], separator: str = "|") -> dict[str, np.ndarray]:
    """One [B, 1] tensor per raw column of ``frame``, in each column's declared datatype (FP32 or BYTES)."""
    missing = [c.name for c in columns if c.name not in frame]
    if missing:
        raise RecopsError(f"rows lack the model's columns {missing}; read them with the model's column spec")
    return {c.name: _tensor(frame[c.name], c.dtype, separator).reshape(-1, 1) for c in columns}


def _tensor(values: pd.Series, dtype: str, separator: str) -> np.ndarray:
    if dtype != "BYTES":
        return pd.to_numeric(values, errors="raise").to_numpy(np.float32, na_value=np.nan)
    return np.array([_text(v, separator).encode() for v in values], dtype=object)


def _text(value, separator: str) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return separator.join(str(v) for v in value)
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


# ---- probes -------------------------------------------------------------------------------------------------------
def random_raw_frame(spec: ColumnSpec, rows: int, rng: np.random.Generator, missing: float = 0.1) -> pd.DataFrame:
    """Raw rows in ``spec``'s columns: dense counts, hex categorical values, 0..L+1 multi-hot values, each missing
    with probability ``missing``."""
    data = {}
    for name in spec.dense:
        values = rng.integers(0, 200, rows).astype(np.float64)
        data[name] = np.where(rng.random(rows) < missing, np.nan, values)
    for name in spec.sparse:
        values = np.array([f"{v:08x}" for v in rng.integers(0, 2**32, rows)], dtype=object)
        data[name] = np.where(rng.random(rows) < missing, "", values)
    for name, length in spec.multi_hot.items():
        counts = rng.integers(0, int(length) + 2, rows)
        data[name] = [spec.separator.join(str(v) for v in rng.integers(0, 50, n)) for n in counts]
    return pd.DataFrame(data)
