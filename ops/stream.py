"""Live traffic as a directory of labelled windows, and a synthetic stream with planted drift.

A stream directory holds one Criteo-format file per window, ``window-00000.tsv``, ``window-00001.tsv``,
... (label first: the label is the feedback that arrives for the window's impressions), optionally with
``window-00000.truth.npy``, the planted click probability of each row (synthetic streams). Files appear
whole (written to a temp file and renamed), so a reader never sees half a window.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

from recops.errors import RecopsError
from recops.training.spec import ColumnSpec

WINDOW_NAME = "window-{:05d}.tsv"


def window_path(stream_dir: Path, index: int) -> Path:
    return Path(stream_dir) / WINDOW_NAME.format(index)


def truth_path(stream_dir: Path, index: int) -> Path:
    return window_path(stream_dir, index).with_suffix(".truth.npy")


def read_window(stream_dir: Path, index: int, spec: ColumnSpec) -> pd.DataFrame | None:
    """The labelled raw rows of window ``index``, or None while it has not arrived."""
    from recops.training.readers import read_frame

    path = window_path(stream_dir, index)
    if not path.is_file():
        return None
    frame = read_frame(path, spec)
    if frame.empty:
        raise RecopsError(f"stream window {path} has no rows; remove it or write the window's rows")
    return frame


def read_truth(stream_dir: Path, index: int) -> np.ndarray | None:
    path = truth_path(stream_dir, index)
    return np.load(path) if path.is_file() else None


@dataclass(frozen=True)
class StreamConfig:
    """A synthetic stream: ``windows`` windows of ``rows`` rows of one synthetic world; from window
    ``drift_at`` on, covariate and/or concept drift of the given strength (``recops.training.synth`` knobs)."""

    windows: int = 10
    rows: int = 4000
    seed: int = 1000
    world_seed: int = 1234
    drift_at: int = 5
    covariate_drift: float = 0.0
    concept_drift: float = 0.0
    drift_features: tuple[str, ...] = ("I1", "I2", "C1", "C2", "C3")

    def __post_init__(self) -> None:
        if self.windows < 1 or self.rows < 1:
            raise RecopsError(f"stream: windows and rows must be >= 1, got {self.windows}, {self.rows}")


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_synthetic_stream(config: StreamConfig, stream_dir: Path) -> list[Path]:
    """Write the stream's missing windows and return all window paths.

    The windows before ``drift_at`` and those from it on are sampled as two runs of the generator
    (one world set-up each) and cut into windows.
    """
    from recops.training.synth import SynthConfig, generate

    stream_dir = Path(stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    paths = [window_path(stream_dir, i) for i in range(config.windows)]
    drift_at = min(max(config.drift_at, 0), config.windows)
    for first, end, drifted in ((0, drift_at, False), (drift_at, config.windows, True)):
        if all(p.is_file() for p in paths[first:end]):
            continue
        data = generate(SynthConfig(rows=(end - first) * config.rows, seed=config.seed + first,
                                    world_seed=config.world_seed,
                                    covariate_drift=config.covariate_drift if drifted else 0.0,
                                    concept_drift=config.concept_drift if drifted else 0.0,
                                    drift_features=config.drift_features))
        for index in range(first, end):
            if not paths[index].is_file():
                part = slice((index - first) * config.rows, (index - first + 1) * config.rows)
                _write_window(stream_dir, index, data, part)
    return paths


def _write_window(stream_dir: Path, index: int, data, part: slice) -> None:
    """One window of generated rows (and their planted probabilities), each file appearing whole."""
    from recops.training.synth import SynthData, to_table

    rows = SynthData(dense=data.dense[part], ranks=data.ranks[part], vocab=data.vocab, label=data.label[part],
                     truth=data.truth[part])
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")

    def save_truth(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, rows.truth)

    _atomic(truth_path(stream_dir, index), save_truth)
    _atomic(window_path(stream_dir, index), lambda tmp: pacsv.write_csv(to_table(rows), tmp, write_options=options))
