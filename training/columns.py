"""Column conversions shared by the raw-data reader and the preprocessing, on Arrow arrays.

One rule set for every caller (ingest, drift, scoring, serving):

- a categorical value is missing when null or empty;
- a dense value is a decimal number (surrounding whitespace allowed); ``nan``, ``inf``, ``-inf`` (any case)
  and overflowing numbers are non-finite and count as missing, like null or empty; anything else is not a
  number (the reader rejects the row as ``non_numeric_dense``; ``Preprocessor.transform`` refuses it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recops.errors import RecopsError

_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_SPECIAL = r"(?i)^[+-]?(inf|infinity|nan)$"
STRING_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)  # pandas' default ``str``, Arrow-backed


def as_arrow(values: pd.Series | pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array | pa.ChunkedArray:
    """A column as Arrow (zero-copy for Arrow-backed pandas columns, which stay chunked)."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        array = values
    else:
        name = getattr(values, "name", "column")
        try:
            array = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise RecopsError(f"column {name}: mixed value types ({exc}); pass one type per column") from exc
    return array


def as_strings(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """String/binary arrays as they are; other scalar types (ids stored as numbers) as their text."""
    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return array
    if pa.types.is_dictionary(kind):
        return as_strings(array.cast(kind.value_type))
    return array.cast(pa.large_string())


def buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [N + 1], data uint8) of a string or binary array; zero-copy for the large types."""
    if pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type):
        offset_type = np.int64
    elif pa.types.is_string(array.type) or pa.types.is_binary(array.type):
        offset_type = np.int32
    else:
        raise TypeError(f"expected string or binary values, got {array.type}")
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, offset_type, len(array) + 1, array.offset * np.dtype(offset_type).itemsize)
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets.astype(np.int64, copy=False), data


def present(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """bool [N]: the string/binary value is neither null nor empty."""
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    parts = []
    for chunk in chunks:
        offsets, _ = buffers(chunk)
        part = offsets[1:] > offsets[:-1]
        if chunk.null_count:
            part &= chunk.is_valid().to_numpy(zero_copy_only=False)
        parts.append(part)
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def to_float(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for missing, bool mask of values that are not numbers)."""
    if (
        pa.types.is_integer(array.type)
        or pa.types.is_floating(array.type)
        or pa.types.is_null(array.type)
        or pa.types.is_boolean(array.type)
        or pa.types.is_decimal(array.type)
    ):
        values, bad = array.cast(pa.float64()).to_numpy(zero_copy_only=False), np.zeros(len(array), bool)
    else:
        values, bad = _parse_floats(as_strings(array))
    values = values.copy() if not values.flags.writeable else values
    values[~np.isfinite(values)] = np.nan
    return values, bad


def _parse_floats(array: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    text = pc.utf8_trim_whitespace(array.cast(pa.large_string()))
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), np.zeros(len(array), bool)
    except pa.ArrowInvalid:
        pass
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)
    number = pc.or_(pc.match_substring_regex(text, _NUMBER), pc.match_substring_regex(text, _SPECIAL))
    bad = pc.invert(pc.fill_null(number, True)).to_numpy(zero_copy_only=False)
    values = pc.cast(pc.if_else(number, text, pa.scalar(None, text.type)), pa.float64())
    return values.to_numpy(zero_copy_only=False), bad


def string_series(array: pa.Array | pa.ChunkedArray) -> pd.Series:
    """A pandas ``str`` column over Arrow strings (zero-copy for large_string); lists as Arrow lists."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return pd.Series(pd.arrays.ArrowExtensionArray(array))
    array = as_strings(array)
    if not pa.types.is_large_string(array.type):
        array = array.cast(pa.large_string())
    return pd.Series(pd.arrays.ArrowStringArray(array, dtype=STRING_DTYPE))
