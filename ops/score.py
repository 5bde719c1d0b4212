"""Batch scoring of unlabelled rows: stream input files in chunks, score them, write Parquet or CSV.

Rows are read in the model's column spec (labels may be absent), prepared by the model's own preprocessor and
scored by an ``OnnxScorer`` or ``TritonScorer``; memory stays bounded by the reader's block size. The output holds
the id columns, the source file (with several inputs), the line number, ``score`` and, for a served model, the
``version`` that answered each row (through a raw-feature model, the deployment's split decides it per request).
Rows that cannot be scored are never dropped silently: they are counted per reason and
written with their file and line to ``<output>.rejects.tsv``. The output appears whole (temp file + rename).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recops.errors import RecopsError
from recops.files import atomic_path
from recops.serving.scorers import OnnxScorer, TritonScorer
from recops.training.readers import Chunk, read_chunks
from recops.training.spec import ColumnSpec

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class ScoreConfig:
    """Where scores go and which input columns come along."""

    output: Path
    id_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if Path(self.output).suffix.lower() not in FORMATS:
            raise RecopsError(f"--output {self.output}: write .parquet, .csv or .tsv")

    @property
    def format(self) -> str:
        return FORMATS[Path(self.output).suffix.lower()]


class _Writer:
    """Streams record batches into one Parquet or CSV/TSV file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt, self._writer = path, fmt, None

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


def score_files(
    scorer: OnnxScorer | TritonScorer,
    inputs: list[Path],
    config: ScoreConfig,
    spec: ColumnSpec | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Score every row of ``inputs``; returns ``rows_scored``, ``rows_rejected`` (per reason too) and the files."""
    spec = spec or scorer.preprocessor.spec
    fmt = config.format
    scored, rejected = 0, {}
    rejects_path = Path(f"{config.output}.rejects.tsv")
    with atomic_path(config.output) as out, atomic_path(rejects_path) as bad, open(bad, "w") as rejects:
        writer = _Writer(out, fmt)
        rejects.write("file\tline\treason\trow\n")
        try:
            for path in inputs:
                for chunk in read_chunks(path, spec, require_label=False, passthrough=config.id_columns):
                    for line, reason, text in chunk.rejects:
                        rejected[reason] = rejected.get(reason, 0) + 1
                        rejects.write(f"{path.name}\t{line}\t{reason}\t{text}\n")
                    if len(chunk.frame):
                        writer.write(_scored(scorer, chunk, path, config, several=len(inputs) > 1))
                        scored += len(chunk.frame)
                        if progress:
                            progress(scored)
            if scored == 0:
                writer.write(_empty(config, several=len(inputs) > 1, served=isinstance(scorer, TritonScorer)))
        finally:
            writer.close()
    return {
        "rows_scored": scored,
        "rows_rejected": sum(rejected.values()),
        "rejected": rejected,
        "output": str(config.output),
        "rejects_file": str(rejects_path),
        "model": scorer.description,
        **({"versions": sorted(scorer.versions)} if scorer.versions else {}),
    }


def _scored(
    scorer: OnnxScorer | TritonScorer, chunk: Chunk, path: Path, config: ScoreConfig, several: bool
) -> pa.Table:
    probs, versions = scorer.score_frame(chunk.frame)
    columns = {c: pa.array(chunk.frame[c].astype("string"), type=pa.string()) for c in config.id_columns}
    if several:
        columns["file"] = pa.array([path.name] * len(probs), type=pa.string())
    columns["line"] = pa.array(chunk.lines, type=pa.int64())
    columns["score"] = pa.array(probs.astype(np.float32), type=pa.float32())
    if versions is not None:
        columns["version"] = pa.array(versions.astype(str), type=pa.string())
    return pa.table(columns)


def _empty(config: ScoreConfig, several: bool, served: bool) -> pa.Table:
    names = [*config.id_columns, *(["file"] if several else []), "line", "score", *(["version"] if served else [])]
    types = {"line": pa.int64(), "score": pa.float32()}
    return pa.table({n: pa.array([], type=types.get(n, pa.string())) for n in names})
