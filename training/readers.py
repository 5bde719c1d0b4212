"""Streaming readers for raw data (Criteo TSV, CSV, Parquet; text plain or gzip) with row validation.

Every row is either returned valid or rejected with its source line number and one of ``REASONS``;
nothing is silently dropped. Validation runs on Arrow arrays (no per-value Python objects); the value
rules are ``recops.training.columns``' (non-finite dense values are missing, as in ``Preprocessor``).
Whole-file problems stop with one :class:`RecopsError` naming the file and the fix: no such file, empty,
binary, not UTF-8, no data rows, missing columns, no label where one is required, and a first block
without a single valid row (a schema or format mismatch, not bad rows).

A :class:`Span` reads one line-aligned byte range of a plain text file (one task's share of a big file): the
layout still comes from the file's start, line numbers are the file's, and the two checks of the whole file's
rows (the first block, no rows at all) belong to the first span and the whole file.
"""

from __future__ import annotations

import csv
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recops.errors import RecopsError
from recops.training.columns import STRING_DTYPE, string_series, to_float
from recops.training.spec import ColumnSpec
from recops.training.textfile import Block, Span, TextFile, preview

REASONS = (
    "field_count",
    "bad_quoting",
    "bad_encoding",
    "line_too_long",
    "non_numeric_dense",
    "bad_label",
    "label_between_thresholds",
)
_CODE = {reason: code for code, reason in enumerate(REASONS, start=1)}  # 0 = valid
_FIXES = {
    "bad_quoting": "a quote opened in one line closes in another: values with line ends are not supported",
    "bad_encoding": "the file is not UTF-8 text: re-encode it, e.g. iconv -f LATIN1 -t UTF-8",
    "line_too_long": "is it a line-oriented text file?",
    "non_numeric_dense": "the spec's dense columns hold text: check the dense list of the column spec (--spec)",
    "bad_label": "labels must be 0/1; for ratings set label_positive_min and label_negative_max in the column spec",
    "label_between_thresholds": "every label lies between label_negative_max and label_positive_min: check them",
}
PARQUET_BATCH_ROWS = 65_536
ARROW_BLOCK = 4 << 20  # Arrow's parsing block within ours: faster than parsing 16 MiB as one


@dataclass
class Chunk:
    """Validated rows of one block plus what was rejected from it."""

    frame: pd.DataFrame  # label int8 (when read), dense float64 (NaN missing), categoricals/passthrough str
    lines: np.ndarray  # source line number of each valid row
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, raw text)


@dataclass(frozen=True)
class _Layout:
    """Which columns a file has and which of them are read."""

    spec: ColumnSpec
    names: tuple[str, ...]  # every column of the file, in order
    label: bool  # the label column is read
    passthrough: tuple[str, ...]  # extra columns carried through unvalidated

    @property
    def strings(self) -> tuple[str, ...]:
        return (*self.spec.sparse, *self.spec.multi_hot, *self.passthrough)

    @property
    def columns(self) -> tuple[str, ...]:
        return ((self.spec.label,) if self.label else ()) + tuple(self.spec.dense) + self.strings


def read_chunks(
    path: Path,
    spec: ColumnSpec,
    block_bytes: int = 16 << 20,
    *,
    require_label: bool = True,
    passthrough: Iterable[str] = (),
    span: Span | None = None,
) -> Iterator[Chunk]:
    """Stream ``path`` as validated chunks.

    ``require_label=False`` reads rows for scoring: the label column may be absent (a Criteo file of the
    spec's columns without the label, a CSV without it) and is not read. ``passthrough`` names extra columns
    (e.g. row ids) carried into ``chunk.frame`` as strings, unvalidated (spec columns are there anyway).
    Text is read in blocks of ``block_bytes``; a longer line is rejected as ``line_too_long``. A background
    thread reads and parses the next block while the caller works on this one. ``span``: only that byte range
    of a plain text file (see the module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise RecopsError(f"input {path}: no such file; pass an existing Criteo TSV, CSV or Parquet file")
    extra = tuple(c for c in dict.fromkeys(passthrough) if c not in spec.columns)
    yield from _prefetched(_chunks(path, spec, block_bytes, require_label, extra, span))


def _chunks(
    path: Path, spec: ColumnSpec, block_bytes: int, require_label: bool, extra: tuple[str, ...], span: Span | None
) -> Iterator[Chunk]:
    if spec.format == "parquet":
        pfile, layout = _parquet_open(path, spec, require_label, extra)
        yield from _checked(path, layout, _parquet_chunks(path, pfile, layout))
        return
    with TextFile(path, block_bytes) as text:
        layout = (_csv_layout if spec.format == "csv" else _criteo_layout)(path, spec, text, require_label, extra)
        if span is not None:
            text.restrict(span)
        chunks = (_block_chunk(block, layout) for block in text.blocks())
        yield from _checked(path, layout, chunks, first=span is None or span.start == 0, whole=span is None)


def _prefetched(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Chunk]:
    """``chunks`` made by a background thread up to ``depth`` ahead, so reading and parsing the next block
    overlaps the caller's work on this one (Arrow and numpy release the GIL); errors surface here."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put(("chunk", chunk)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))
        finally:
            chunks.close()

    thread = threading.Thread(target=produce, name="recops-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = queue.get()
            if kind == "error":
                raise item
            if kind == "end":
                return
            yield item
    finally:
        stop.set()
        thread.join()


def read_frame(
    path: Path, spec: ColumnSpec | None = None, *, require_label: bool = True, passthrough: Iterable[str] = ()
) -> pd.DataFrame:
    """Read a small file whole; any rejected row is an error (used by clients and tools)."""
    spec = spec or ColumnSpec.criteo()
    chunks = list(read_chunks(path, spec, require_label=require_label, passthrough=passthrough))
    rejects = sorted(r for c in chunks for r in c.rejects)
    if rejects:
        line, reason, _ = rejects[0]
        raise RecopsError(
            f"input {path}: {len(rejects)} invalid rows (first: line {line}, {reason}); fix or remove them"
        )
    return pd.concat([c.frame for c in chunks if len(c.frame)], ignore_index=True)


def _checked(
    path: Path, layout: _Layout, chunks: Iterator[Chunk], first: bool = True, whole: bool = True
) -> Iterator[Chunk]:
    """Stop on a file with no data rows (``whole``: these are all its rows), or whose first rows are all rejected
    (``first``: these rows start the file; a mismatch, not bad rows)."""
    rows = 0
    for chunk in chunks:
        if first and rows == 0 and chunk.rejects and not len(chunk.frame):
            raise _nothing_valid(path, layout, chunk.rejects)
        rows += len(chunk.frame) + len(chunk.rejects)
        yield chunk
    if whole and rows == 0:
        raise RecopsError(
            f"input {path}: no data rows{' after the header' if layout.spec.format == 'csv' else ''}; "
            "pass a file with rows"
        )


def _nothing_valid(path: Path, layout: _Layout, rejects: list[tuple[int, str, str]]) -> RecopsError:
    reasons = Counter(reason for _, reason, _ in rejects)
    reason = reasons.most_common(1)[0][0]
    if reason == "field_count":
        return RecopsError(
            f"input {path}: schema mismatch: no row has the expected {len(layout.names)} fields "
            f"({', '.join(layout.names[:3])}, ...); is this {layout.spec.format} data matching the column spec "
            "(--spec)?"
        )
    line, _, text = next(r for r in rejects if r[1] == reason)
    return RecopsError(
        f"input {path}: no valid row among the first {len(rejects)} (rejected: {dict(reasons)}; "
        f"first: line {line}: {text[:80]!r}); {_FIXES[reason]}"
    )


def _criteo_layout(
    path: Path, spec: ColumnSpec, text: TextFile, require_label: bool, passthrough: tuple[str, ...]
) -> _Layout:
    """Criteo TSV: the spec's columns in order, the label first; a file whose rows have one field less has none."""
    if passthrough:
        raise RecopsError(
            f"input {path}: a Criteo file has only the spec's columns, not {list(passthrough)}; "
            "pass row ids in a CSV (with a header) or Parquet file"
        )
    fields = Counter(line.count(b"\t") + 1 for line in text.first_lines())
    labelled = not fields or fields.most_common(1)[0][0] != len(spec.columns) - 1
    _check_label(path, spec, labelled, require_label)
    names = spec.columns if labelled else spec.columns[1:]
    return _Layout(spec, tuple(names), labelled and require_label, passthrough)


def _csv_layout(
    path: Path, spec: ColumnSpec, text: TextFile, require_label: bool, passthrough: tuple[str, ...]
) -> _Layout:
    header = next(csv.reader([text.header()]), [])
    missing = [c for c in (*spec.dense, *spec.sparse, *spec.multi_hot) if c not in header]
    if missing:
        raise RecopsError(
            f"input {path}: CSV header lacks columns {missing} named in the column spec; header is {header}"
        )
    absent = [c for c in passthrough if c not in header]
    if absent:
        raise RecopsError(f"input {path}: CSV header lacks the passthrough columns {absent}; header is {header}")
    _check_label(path, spec, spec.label in header, require_label)
    layout = _Layout(spec, tuple(header), spec.label in header and require_label, passthrough)
    doubled = [c for c, n in Counter(header).items() if n > 1 and c in layout.columns]
    if doubled:
        raise RecopsError(f"input {path}: CSV header names {doubled} more than once; rename the duplicates")
    return layout


def _check_label(path: Path, spec: ColumnSpec, present: bool, require_label: bool) -> None:
    if require_label and not present:
        where = {"csv": "a header column", "parquet": "a column"}.get(spec.format, "the first field")
        raise RecopsError(
            f"input {path}: no label column {spec.label!r}; training data needs it as {where} "
            "(unlabelled rows can be scored, not ingested)"
        )


def _block_chunk(block: Block, layout: _Layout) -> Chunk:
    """Parse and validate one clean block; lines the parser cannot split into the file's fields are rejects."""
    parsed = _parse_lines(block.data, len(block.lines), layout) if block.data else None
    if parsed:
        table, rows, unparsed = parsed
        pieces = [(table, rows)]
    else:
        block = block.checked_lines() if block.data else block  # empty lines, which the parser skips, out
        pieces, unparsed = _parse_range(block, 0, len(block.lines), layout) if block.data else ([], [])
    chunks = [
        _validate(table, block.lines[rows], layout, lambda i, rows=rows: block.line_text(rows[i]))
        for table, rows in pieces
    ]
    rejects = block.rejects + [(int(block.lines[i]), reason, preview(text)) for i, reason, text in unparsed]
    rejects += [r for c in chunks for r in c.rejects]
    frames = [c.frame for c in chunks if len(c.frame)]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0] if frames else _empty_frame(layout)
    lines = np.concatenate([c.lines for c in chunks]) if chunks else np.zeros(0, np.int64)
    return Chunk(frame, lines, sorted(rejects))


def _parse_range(block: Block, start: int, stop: int, layout: _Layout) -> tuple[list, list[tuple[int, str, str]]]:
    """Parse lines ``start:stop`` of a block: ([(table, line indexes of its rows)], [(line index, reason, text)]).

    Where the parser's rows do not match the lines one to one (a quote left open joins lines), the range is
    halved until they do; a single line that still does not parse on its own is ``bad_quoting``."""
    parsed = _parse_lines(block.span(start, stop), stop - start, layout)
    if parsed is not None:
        table, rows, invalid = parsed
        return [(table, start + rows)], [(start + i, reason, text) for i, reason, text in invalid]
    if stop - start == 1:
        return [], [(start, "bad_quoting", block.line_text(start))]
    middle = (start + stop) // 2
    head, tail = _parse_range(block, start, middle, layout), _parse_range(block, middle, stop, layout)
    return head[0] + tail[0], head[1] + tail[1]


def _parse_lines(data: bytes, count: int, layout: _Layout) -> tuple[pa.Table, np.ndarray, list] | None:
    """Parse ``count`` whole lines: (table, line index of each row, [(line index, "field_count", text)] of rows
    with the wrong field count), or None when rows and lines do not match one to one (empty lines, quotes
    spanning lines; a quote left open in the last line takes its line end into the value)."""
    try:
        table, invalid = _parse(data, layout)
    except pa.ArrowInvalid:
        return None
    if table.num_rows + len(invalid) != count or any(n is None for n, _ in invalid):
        return None
    if _open_quote_at_end(table, layout):
        return None
    rows = np.ones(count, bool)
    rows[[n - 1 for n, _ in invalid]] = False
    return table, np.flatnonzero(rows), [(n - 1, "field_count", text) for n, text in invalid]


def _open_quote_at_end(table: pa.Table, layout: _Layout) -> bool:
    """A line end inside a value of the last row: its quote was never closed."""
    if layout.spec.format != "csv" or not table.num_rows:
        return False
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    return any(isinstance(v, str) and "\n" in v for v in last.values())


def _parse(data: bytes, layout: _Layout, typed: bool = True) -> tuple[pa.Table, list[tuple[int | None, str]]]:
    """Arrow's CSV parser on whole lines: numbers typed as float64 (``typed``) or every column as text."""
    invalid: list[tuple[int | None, str]] = []

    def skip(row) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    numeric = (layout.spec.label, *layout.spec.dense) if typed else ()
    types = {c: pa.float64() if c in numeric else pa.large_string() for c in layout.columns}
    criteo = layout.spec.format == "criteo"
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=list(layout.names), use_threads=False, block_size=ARROW_BLOCK),
            parse_options=pacsv.ParseOptions(
                delimiter="\t" if criteo else ",", quote_char=False if criteo else '"', invalid_row_handler=skip
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                include_columns=list(layout.columns),
                null_values=[""],
                strings_can_be_null=True,
                check_utf8=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        if typed and "conversion error" in str(exc):
            return _parse(data, layout, typed=False)
        raise
    return table, invalid


def _parquet_open(
    path: Path, spec: ColumnSpec, require_label: bool, passthrough: tuple[str, ...]
) -> tuple[pq.ParquetFile, _Layout]:
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise RecopsError(
            f"input {path}: not a readable Parquet file ({exc}); pass Parquet, or set the column "
            "spec's format to criteo or csv for text"
        ) from exc
    names = pfile.schema_arrow.names
    missing = [c for c in (*spec.dense, *spec.sparse, *spec.multi_hot, *passthrough) if c not in names]
    if missing:
        raise RecopsError(f"input {path}: Parquet file lacks columns {missing} named in the column spec or passthrough")
    _check_label(path, spec, spec.label in names, require_label)
    return pfile, _Layout(spec, tuple(names), spec.label in names and require_label, passthrough)


def _parquet_chunks(path: Path, pfile: pq.ParquetFile, layout: _Layout) -> Iterator[Chunk]:
    start = 1
    try:
        for batch in pfile.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(layout.columns)):
            table = pa.Table.from_batches([batch])
            lines = np.arange(start, start + len(table))
            yield _validate(table, lines, layout, lambda i, t=table: _row_text(t, i))
            start += len(table)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RecopsError(
            f"input {path}: Parquet data unreadable after row {start - 1} ({exc}); the file is damaged: rewrite it"
        ) from exc


def _row_text(table: pa.Table, index: int) -> str:
    row = table.slice(index, 1).to_pylist()[0]
    return "\t".join("" if v is None else str(v) for v in row.values())


def _validate(table: pa.Table, lines: np.ndarray, layout: _Layout, line_text: Callable[[int], str]) -> Chunk:
    """Type the columns and reject rows with a non-numeric dense value or an unusable label."""
    spec = layout.spec
    reasons = np.zeros(table.num_rows, np.int8)
    dense = {}
    for name in spec.dense:
        dense[name], bad = to_float(_column(table, name))
        reasons[bad & (reasons == 0)] = _CODE["non_numeric_dense"]
    labels = None
    if layout.label:
        labels, why = _labels(_column(table, spec.label), spec)
        reasons = np.where(reasons == 0, why, reasons)
    bad = np.flatnonzero(reasons)
    rejects = [(int(lines[i]), REASONS[reasons[i] - 1], preview(line_text(int(i)))) for i in bad]
    if len(bad):
        keep = reasons == 0
        table, lines = table.filter(pa.array(keep)), lines[keep]
        dense = {name: values[keep] for name, values in dense.items()}
        labels = labels[keep] if labels is not None else None
    columns = {} if labels is None else {spec.label: labels}
    columns.update(dense)
    columns.update({name: string_series(_column(table, name)) for name in layout.strings})
    return Chunk(pd.DataFrame(columns, copy=False), lines, rejects)


def _column(table: pa.Table, name: str) -> pa.Array | pa.ChunkedArray:
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column


def _labels(array: pa.Array, spec: ColumnSpec) -> tuple[np.ndarray, np.ndarray]:
    """(int8 clicks, reason codes): 0/1 labels, or ratings turned into clicks by the spec's thresholds."""
    values, _ = to_float(array)
    if spec.label_positive_min is None:
        usable = (values == 0) | (values == 1)
        return np.where(usable, values, 0).astype(np.int8), np.where(usable, 0, _CODE["bad_label"]).astype(np.int8)
    positive, negative = values >= spec.label_positive_min, values <= spec.label_negative_max
    reasons = np.where(np.isnan(values), _CODE["bad_label"], 0)
    reasons[~positive & ~negative & ~np.isnan(values)] = _CODE["label_between_thresholds"]
    return positive.astype(np.int8), reasons.astype(np.int8)


def _empty_frame(layout: _Layout) -> pd.DataFrame:
    columns = {layout.spec.label: pd.Series(dtype=np.int8)} if layout.label else {}
    columns.update({name: pd.Series(dtype=np.float64) for name in layout.spec.dense})
    columns.update({name: pd.Series(dtype=STRING_DTYPE) for name in layout.strings})
    return pd.DataFrame(columns)
