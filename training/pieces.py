"""Input files cut into pieces, the unit of work of an :class:`~recops.training.engine.Engine`.

A piece is a whole file, or a line-aligned byte range of a plain text file larger than the engine's range size
(gzip streams and Parquet files are read whole). The cuts are found by reading a little after each nominal
offset, up to the next line end; the line number a range starts at is one more than the line ends before it,
counted by the engine (one job per range, in parallel), so line numbers stay the file's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

from recops.training.engine import Engine
from recops.training.spec import ColumnSpec
from recops.training.textfile import Span

_GZIP = b"\x1f\x8b"
_SCAN = 64 << 10


@dataclass(frozen=True)
class Piece:
    """One task's share of the inputs: file ``ordinal`` (its position among them), whole or a ``span`` of it."""

    path: Path
    ordinal: int
    span: Span | None = None


def plan(paths: list[Path], spec: ColumnSpec, engine: Engine) -> list[Piece]:
    """The pieces of ``paths``, in input order; each file's ranges in file order."""
    cuts = {i: _cuts(p, engine.config.ranges) for i, p in enumerate(paths) if _splittable(p, spec, engine)}
    before_last = [(paths[i], a, b) for i, bounds in cuts.items() for a, b in zip(bounds[:-2], bounds[1:-1])]
    counts = iter(list(engine.map(count_lines, before_last)))
    pieces = []
    for i, path in enumerate(paths):
        if i not in cuts:
            pieces.append(Piece(path, i))
            continue
        bounds = cuts[i]
        firsts = accumulate((next(counts) for _ in bounds[2:]), initial=1)
        pieces += [Piece(path, i, Span(a, b, f)) for a, b, f in zip(bounds, bounds[1:], firsts)]
    return pieces


def count_lines(path: Path, start: int, stop: int, block: int = 16 << 20) -> Iterator[int]:
    """The number of line ends in bytes ``[start, stop)`` of ``path`` (a job: one output)."""
    count = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while start < stop:
            data = fh.read(min(block, stop - start))
            if not data:
                break
            count += data.count(b"\n")
            start += len(data)
    yield count


def _splittable(path: Path, spec: ColumnSpec, engine: Engine) -> bool:
    """A plain text file larger than the engine's range size."""
    if spec.format == "parquet" or engine.config.ranges is None or path.stat().st_size <= engine.config.ranges:
        return False
    with open(path, "rb") as fh:
        return not fh.read(2).startswith(_GZIP)


def _cuts(path: Path, size: int) -> list[int]:
    """0, the cuts (each just after the first line end at least ``size`` bytes after the previous cut), the size."""
    total = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as fh:
        while bounds[-1] + size < total:
            end = _next_line_end(fh, bounds[-1] + size - 1)
            if end is None or end + 1 >= total:
                break
            bounds.append(end + 1)
    return [*bounds, total]


def _next_line_end(fh, offset: int) -> int | None:
    """The offset of the first ``\\n`` at or after ``offset``, or None."""
    fh.seek(offset)
    while data := fh.read(_SCAN):
        found = data.find(b"\n")
        if found >= 0:
            return offset + found
        offset += len(data)
    return None
