"""Live traffic as a directory of labelled windows, and a synthetic stream with planted drift.

A stream directory holds one Criteo-format file per window, ``window-00000.tsv``, ``window-00001.tsv``,
... (label first: the label is the feedback that arrives for the window's impressions), optionally with
``window-00000.truth.npy``, the planted click probability of each row (synthetic streams). Files appear
whole (written to a temp file and renamed), so a reader never sees half a window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv

from recops.errors import RecopsError
from recops.files import atomic_path
from recops.training.spec import ColumnSpec
from recops.training.synth import SynthConfig, SynthData, generate, to_table

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
    """A synthetic stream: ``windows`` windows of ``rows`` rows from ``synth``'s world (``recops.training.synth``),
    with ``synth``'s covariate and concept drift from window ``drift_at`` on (none before it)."""

    windows: int = 10
    rows: int = 4000
    drift_at: int = 5
    synth: SynthConfig = SynthConfig(seed=1000)

    def __post_init__(self) -> None:
        if self.windows < 1 or self.rows < 1:
            raise RecopsError(f"stream: windows and rows must be >= 1, got {self.windows}, {self.rows}")


def write_synthetic_stream(config: StreamConfig, stream_dir: Path) -> list[Path]:
    """Write the stream's missing windows and return all window paths.

    The windows before ``drift_at`` and those from it on are sampled as two runs of the generator
    (one world set-up each) and cut into windows.
    """
    stream_dir = Path(stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    paths = [window_path(stream_dir, i) for i in range(config.windows)]
    drift_at = min(max(config.drift_at, 0), config.windows)
    for first, end, drifted in ((0, drift_at, False), (drift_at, config.windows, True)):
        if all(p.is_file() for p in paths[first:end]):
            continue
        synth = config.synth if drifted else replace(config.synth, covariate_drift=0.0, concept_drift=0.0)
        data = generate(replace(synth, rows=(end - first) * config.rows, seed=config.synth.seed + first))
        for index in range(first, end):
            if not paths[index].is_file():
                part = slice((index - first) * config.rows, (index - first + 1) * config.rows)
                _write_window(stream_dir, index, data, part)
    return paths


def _write_window(stream_dir: Path, index: int, data, part: slice) -> None:
    """One window of generated rows (and their planted probabilities), each file appearing whole."""
    rows = SynthData(
        dense=data.dense[part], ranks=data.ranks[part], vocab=data.vocab, label=data.label[part], truth=data.truth[part]
    )
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")

    with atomic_path(truth_path(stream_dir, index)) as tmp, open(tmp, "wb") as fh:
        np.save(fh, rows.truth)
    with atomic_path(window_path(stream_dir, index)) as tmp:
        pacsv.write_csv(to_table(rows), tmp, write_options=options)
