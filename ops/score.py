"""Batch scoring of unlabelled rows: stream input files in chunks, score them, write Parquet or CSV.

Rows are read in the model's column spec (labels may be absent), prepared by the model's own preprocessor and
scored by an ``OnnxScorer`` or ``TritonScorer`` (opened from a picklable ``ScorerFactory``); memory stays bounded by
the reader's block size. The output holds the id columns, the source file (with several inputs), the line number,
``score`` and, for a served model, the ``version`` that answered each row (through a raw-feature model, the
deployment's split decides it per request). Rows that cannot be scored are never dropped silently: they are counted
per reason and written with their file and line to ``<output>.rejects.tsv``.

``output`` is one file (.parquet, .csv, .tsv; written by this process) or a directory (no suffix) of Parquet shards
``part-00000.parquet``, ... , one per piece of the inputs (a file, or a line-aligned range of a big plain file;
see ``recops.training.pieces``), each written where its piece is scored: rows are in input order across the shards.
With ``--engine ray`` the pieces are scored by Ray tasks in parallel (one ONNX Runtime thread each), so a directory
is the output; on a cluster it must be on storage every node writes to. Either output appears whole (temp file or
directory + rename).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recops.errors import RecopsError
from recops.files import atomic_path, staging_dir
from recops.ops.evaluate import Scorer, ScorerFactory
from recops.serving.scorers import TritonScorer
from recops.training.engine import Engine, EngineConfig
from recops.training.pieces import Piece, plan
from recops.training.readers import Chunk, read_chunks
from recops.training.spec import ColumnSpec

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
SHARD = "part-{:05d}.parquet"


@dataclass(frozen=True)
class ScoreConfig:
    """Where scores go and which input columns come along."""

    output: Path
    id_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        suffix = Path(self.output).suffix.lower()
        if suffix and suffix not in FORMATS:
            raise RecopsError(f"--output {self.output}: write .parquet, .csv or .tsv, or a directory (no suffix)")

    @property
    def sharded(self) -> bool:
        """A directory of Parquet shards."""
        return not Path(self.output).suffix

    @property
    def format(self) -> str:
        return "parquet" if self.sharded else FORMATS[Path(self.output).suffix.lower()]


class _Writer:
    """Streams record batches into one Parquet or CSV/TSV file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self._writer = path, fmt, None

    @property
    def empty(self) -> bool:
        return self._writer is None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            if self.fmt == "parquet":
                self._writer = pq.ParquetWriter(self.path, table.schema)
            else:
                options = pacsv.WriteOptions(delimiter="\t" if self.fmt == "tsv" else ",")
                self._writer = pacsv.CSVWriter(self.path, table.schema, write_options=options)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class _Job:
    """What every piece of a scoring run needs (pickled into Ray tasks)."""

    factory: ScorerFactory
    spec: ColumnSpec
    id_columns: tuple[str, ...]
    several: bool  # several inputs: a file column
    block_bytes: int
    threads: int  # ONNX Runtime threads per scorer (0: its default)


@dataclass
class _Scored:
    """One chunk of a piece: its scores (None when the piece writes its own shard), rejects and row count."""

    file: str
    table: pa.Table | None
    rejects: list[tuple[int, str, str]]
    rows: int


@dataclass(frozen=True)
class _Answered:
    """The last output of a piece: which model scored it."""

    description: str
    versions: tuple[str, ...]


def score_files(
    factory: ScorerFactory,
    inputs: list[Path],
    config: ScoreConfig,
    spec: ColumnSpec | None = None,
    progress: Callable[[int], None] | None = None,
    engine: EngineConfig | None = None,
) -> dict[str, Any]:
    """Score every row of ``inputs``; returns ``rows_scored``, ``rows_rejected`` (per reason too) and the files."""
    engine = engine or EngineConfig()
    check_output(config, engine)
    spec = spec or factory.preprocessor.spec
    scored, rejected, models, versions = 0, {}, set(), set()
    rejects_path = Path(f"{config.output}.rejects.tsv")
    with (
        Engine(engine) as run,
        _destination(config) as out,
        atomic_path(rejects_path) as bad,
        open(bad, "w") as rejects,
    ):
        rejects.write("file\tline\treason\trow\n")
        pieces = plan(inputs, spec, run)
        job = _Job(factory, spec, config.id_columns, len(inputs) > 1, run.config.block_bytes, int(engine.name == "ray"))
        shards = (out / SHARD.format(i) if config.sharded else None for i in range(len(pieces)))
        writer = None if config.sharded else _Writer(out, config.format)
        try:
            for item in run.map(_score_piece, ((p, job, shard) for p, shard in zip(pieces, shards))):
                if isinstance(item, _Answered):
                    models.add(item.description)
                    versions.update(item.versions)
                    continue
                for line, reason, text in item.rejects:
                    rejected[reason] = rejected.get(reason, 0) + 1
                    rejects.write(f"{item.file}\t{line}\t{reason}\t{text}\n")
                if item.table is not None:
                    writer.write(item.table)
                scored += item.rows
                if progress and item.rows:
                    progress(scored)
            if writer is not None and writer.empty:
                writer.write(_empty(job, served=factory.served is not None))
        finally:
            if writer is not None:
                writer.close()
    return {
        "rows_scored": scored,
        "rows_rejected": sum(rejected.values()),
        "rejected": rejected,
        "output": str(config.output),
        **({"shards": len(pieces)} if config.sharded else {}),
        "rejects_file": str(rejects_path),
        "model": ", ".join(sorted(models)),
        "engine": run.describe(),
        **({"versions": sorted(versions)} if versions else {}),
    }


def check_output(config: ScoreConfig, engine: EngineConfig) -> None:
    """The output fits the engine: Ray writes shards, into a directory that does not exist yet."""
    if engine.name == "ray" and not config.sharded:
        raise RecopsError(f"--output {config.output}: --engine ray writes Parquet shards: pass a directory (no suffix)")
    if config.sharded and Path(config.output).exists():
        raise RecopsError(f"--output {config.output}: exists; remove it or pass a new directory")


@contextlib.contextmanager
def _destination(config: ScoreConfig) -> Iterator[Path]:
    """A temporary file or directory beside the output, renamed onto it when the block ends normally."""
    if not config.sharded:
        with atomic_path(config.output) as tmp:
            yield tmp
        return
    with staging_dir(config.output) as tmp:
        yield tmp
        tmp.rename(config.output)


def _score_piece(piece: Piece, job: _Job, shard: Path | None) -> Iterator[_Scored | _Answered]:
    """Score one piece (a job): a ``_Scored`` per chunk, then who answered. With ``shard`` the scores go into that
    Parquet file (an empty one with the columns when no row is valid), else back to the caller."""
    scorer = job.factory.open(job.threads)
    writer = _Writer(shard, "parquet") if shard else None
    try:
        chunks = read_chunks(
            piece.path, job.spec, job.block_bytes, require_label=False, passthrough=job.id_columns, span=piece.span
        )
        for chunk in chunks:
            table = _scored(scorer, chunk, piece.path, job) if len(chunk.frame) else None
            if writer is not None and table is not None:
                writer.write(table)
            yield _Scored(piece.path.name, None if writer else table, chunk.rejects, len(chunk.frame))
        if writer is not None and writer.empty:
            writer.write(_empty(job, served=isinstance(scorer, TritonScorer)))
    finally:
        if writer is not None:
            writer.close()
        scorer.close()
    yield _Answered(scorer.description, tuple(sorted(scorer.versions)))


def _scored(scorer: Scorer, chunk: Chunk, path: Path, job: _Job) -> pa.Table:
    probs, versions = scorer.score_frame(chunk.frame)
    columns = {c: pa.array(chunk.frame[c].astype("string"), type=pa.string()) for c in job.id_columns}
    if job.several:
        columns["file"] = pa.array([path.name] * len(probs), type=pa.string())
    columns["line"] = pa.array(chunk.lines, type=pa.int64())
    columns["score"] = pa.array(probs.astype(np.float32), type=pa.float32())
    if versions is not None:
        columns["version"] = pa.array(versions.astype(str), type=pa.string())
    return pa.table(columns)


def _empty(job: _Job, served: bool) -> pa.Table:
    names = [*job.id_columns, *(["file"] if job.several else []), "line", "score", *(["version"] if served else [])]
    types = {"line": pa.int64(), "score": pa.float32()}
    return pa.table({n: pa.array([], type=types.get(n, pa.string())) for n in names})
