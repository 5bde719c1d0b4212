"""Streaming readers for raw data (Criteo TSV, CSV, Parquet) with row validation.

Every row is either returned valid or rejected with its source line number and a reason; nothing is
silently dropped. A file whose every row has the wrong field count is a schema mismatch and stops
with one error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recops.errors import RecopsError
from recops.training.spec import ColumnSpec

REASONS = ("field_count", "non_numeric_dense", "bad_label")


@dataclass
class Chunk:
    """Validated rows of one block plus what was rejected from it."""

    frame: pd.DataFrame  # spec columns; dense float64 (NaN missing), label int, categoricals str/None
    lines: np.ndarray  # source line number of each valid row
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, raw text)


def read_chunks(path: Path, spec: ColumnSpec, block_bytes: int = 16 << 20) -> Iterator[Chunk]:
    """Stream ``path`` as validated chunks."""
    path = Path(path)
    if not path.is_file():
        raise RecopsError(f"input {path}: no such file; pass an existing Criteo TSV, CSV or Parquet file")
    if spec.format == "parquet":
        yield from _parquet_chunks(path, spec)
    else:
        yield from _text_chunks(path, spec, block_bytes)


def read_frame(path: Path, spec: ColumnSpec | None = None) -> pd.DataFrame:
    """Read a small file whole; any rejected row is an error (used by clients and tools)."""
    spec = spec or ColumnSpec.criteo()
    chunks = list(read_chunks(path, spec))
    rejects = [r for c in chunks for r in c.rejects]
    if rejects:
        line, reason, _ = rejects[0]
        raise RecopsError(
            f"input {path}: {len(rejects)} invalid rows (first: line {line}, {reason}); fix or remove them"
        )
    frames = [c.frame for c in chunks]
    return pd.concat(frames, ignore_index=True) if frames else _empty_frame(spec)


def _empty_frame(spec: ColumnSpec) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in spec.columns})


def _text_chunks(path: Path, spec: ColumnSpec, block_bytes: int) -> Iterator[Chunk]:
    bad: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        bad.append((row.number, row.text))
        return "skip"

    header = spec.format == "csv"
    names = _csv_header(path, spec) if header else list(spec.columns)
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(
            column_names=names, skip_rows=int(header), block_size=block_bytes, use_threads=False
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if spec.format == "criteo" else ",",
            quote_char=False if spec.format == "criteo" else '"',
            ignore_empty_lines=False,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, include_columns=list(spec.columns), strings_can_be_null=True
        ),
    )
    next_line, seen_valid = 1 + int(header), 0
    for batch in reader:
        pending = np.array(sorted(n for n, _ in bad), dtype=np.int64)
        n = batch.num_rows
        candidates = np.arange(next_line, next_line + n + len(pending))
        lines = candidates[~np.isin(candidates, pending)][:n]
        if n:
            next_line = int(lines[-1]) + 1
        seen_valid += n
        rejects = [(line, "field_count", text) for line, text in bad if line < next_line or n == 0]
        bad = [(line, text) for line, text in bad if not (line < next_line or n == 0)]
        if seen_valid == 0 and rejects:
            raise _schema_mismatch(path, spec, names)
        yield _validate(batch.to_pandas(), lines, spec, rejects)
    if bad and seen_valid == 0:
        raise _schema_mismatch(path, spec, names)
    if bad:
        yield Chunk(
            frame=_empty_frame(spec), lines=np.zeros(0, np.int64), rejects=[(n, "field_count", t) for n, t in bad]
        )


def _schema_mismatch(path: Path, spec: ColumnSpec, names: list[str]) -> RecopsError:
    return RecopsError(
        f"input {path}: schema mismatch: no row has the expected {len(names)} fields "
        f"({', '.join(names[:3])}, ...); is this {spec.format} data matching the column spec (--spec)?"
    )


def _csv_header(path: Path, spec: ColumnSpec) -> list[str]:
    with open(path, newline="") as fh:
        header = fh.readline().rstrip("\r\n").split(",")
    missing = [c for c in spec.columns if c not in header]
    if missing:
        raise RecopsError(
            f"input {path}: CSV header lacks columns {missing} named in the column spec; header is {header}"
        )
    return header


def _parquet_chunks(path: Path, spec: ColumnSpec) -> Iterator[Chunk]:
    pfile = pq.ParquetFile(path)
    missing = [c for c in spec.columns if c not in pfile.schema_arrow.names]
    if missing:
        raise RecopsError(f"input {path}: Parquet file lacks columns {missing} named in the column spec")
    start = 1
    for batch in pfile.iter_batches(columns=list(spec.columns)):
        frame = batch.to_pandas()
        lines = np.arange(start, start + len(frame))
        start += len(frame)
        yield _validate(frame, lines, spec, [])


def _validate(frame: pd.DataFrame, lines: np.ndarray, spec: ColumnSpec, rejects: list) -> Chunk:
    """Type the columns and reject rows with a non-numeric dense value or a label not in {0, 1}."""
    reason = pd.Series("", index=frame.index, dtype=object)
    reason[frame.isna().all(axis=1)] = "field_count"  # an empty line parses as a row of nulls
    dense = {}
    for name in spec.dense:
        raw = frame[name]
        values = pd.to_numeric(raw, errors="coerce")
        present = raw.notna() & (raw.astype(str).str.strip() != "") if raw.dtype == object else raw.notna()
        reason[present & values.isna() & (reason == "")] = "non_numeric_dense"
        dense[name] = values.astype(np.float64)
    label = pd.to_numeric(frame[spec.label], errors="coerce")
    reason[~label.isin([0, 1]) & (reason == "")] = "bad_label"
    bad = (reason != "").to_numpy()
    if bad.any():
        texts = frame[bad].astype(str).where(frame[bad].notna(), "").agg("\t".join, axis=1).str.rstrip("\t")
        rejects = rejects + list(zip(lines[bad].tolist(), reason[bad].tolist(), texts.tolist()))
    out = frame.assign(**dense, **{spec.label: label})[~bad].reset_index(drop=True)
    out[spec.label] = out[spec.label].astype(np.int8)
    for name in (*spec.sparse, *spec.multi_hot):
        if out[name].dtype != object:
            out[name] = out[name].astype(object)
    return Chunk(frame=out, lines=lines[~bad], rejects=rejects)
