"""Versioned processed datasets: raw files -> ``<root>/<version>/`` with a manifest and reference stats.

Layout of a version directory::

    manifest.json          version, inputs (sha256), rows per split, rejected per reason, schema,
                           preprocess config, split config
    preprocessor.json      the fitted Preprocessor (spec, config, vocabularies) serving reuses
    stats.json ...         reference statistics per feature (training.stats)
    rejects.tsv            line <TAB> reason <TAB> raw row, per input file
    {train,val,test}/      dense.npy float32 [N, D], sparse.npy int64 [N, S], label.npy float32 [N],
                           multi_<name>.npy int64 [N, L]

Same inputs + configs -> same version id; the directory appears whole (temp dir + rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.training.preprocess import Features, Preprocessor
from recops.training.readers import read_chunks
from recops.training.spec import ColumnSpec, PreprocessConfig, canonical_json

SPLITS = ("train", "val", "test")
_MULT = 2654435761


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic pseudo-random split by valid-row index, plus the reference-sample size."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    reference_rows: int = 200_000

    def assign(self, index: np.ndarray) -> np.ndarray:
        """0 = train, 1 = val, 2 = test for global valid-row indices."""
        bucket = ((index.astype(np.uint64) * np.uint64(_MULT)) % np.uint64(10_000)).astype(np.int64) / 10_000
        return np.where(bucket < self.val_fraction, 1, np.where(bucket < self.val_fraction + self.test_fraction, 2, 0))


@dataclass
class Dataset:
    """An opened processed dataset version."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "Dataset":
        path = Path(path)
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise RecopsError(f"dataset {path}: no manifest.json; pass a directory made by `recops data ingest`")
        return cls(path, json.loads(manifest.read_text()))

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(json.loads((self.path / "preprocessor.json").read_text()))

    def split(self, name: str) -> Features:
        """Memory-mapped features of one split."""
        if name not in SPLITS:
            raise RecopsError(f"dataset {self.path}: unknown split {name!r}; use one of {SPLITS}")
        d = self.path / name
        load = lambda f: np.load(d / f, mmap_mode="r")  # noqa: E731
        spec = self.preprocessor.spec
        return Features(
            dense=load("dense.npy"),
            sparse=load("sparse.npy"),
            multi={m: load(f"multi_{m}.npy") for m in spec.multi_hot},
            label=load("label.npy"),
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def version_id(input_hashes: list[str], spec: ColumnSpec, config: PreprocessConfig, split: SplitConfig) -> str:
    key = canonical_json(
        {"inputs": input_hashes, "spec": spec.to_dict(), "pre": config.to_dict(), "split": asdict(split)}
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class _SplitWriter:
    """Appends arrays per split straight into .npy files; their fixed-size header is rewritten at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.shapes: dict[tuple[str, str], tuple[np.dtype, tuple[int, ...], int]] = {}

    def append(self, split: str, arrays: dict[str, np.ndarray]) -> None:
        (self.root / split).mkdir(exist_ok=True)
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            dtype, tail, rows = self.shapes.get((split, name), (arr.dtype, arr.shape[1:], 0))
            with open(self.root / split / f"{name}.npy", "ab") as fh:
                if fh.tell() == 0:
                    fh.write(_npy_header(dtype, (0, *tail)))
                fh.write(arr.data)
            self.shapes[(split, name)] = (dtype, tail, rows + len(arr))

    def finish(self, templates: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> dict[str, int]:
        rows = {}
        for split in SPLITS:
            (self.root / split).mkdir(exist_ok=True)
            for name, (dtype, tail) in templates.items():
                _, _, n = self.shapes.get((split, name), (dtype, tail, 0))
                path = self.root / split / f"{name}.npy"
                with open(path, "r+b" if path.is_file() else "wb") as fh:
                    fh.write(_npy_header(dtype, (n, *tail)))
                rows[split] = n
        return rows


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy header; numpy pads it so its size does not depend on the row count."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


class BottomKSample:
    """A uniform sample of ``k`` rows from a stream of frames: every row draws a random key and the ``k``
    smallest keys are kept (bottom-k), so early and late rows are equally likely to be in it."""

    def __init__(self, k: int, seed: int = 0):
        self.k = k
        self._rng = np.random.default_rng(seed)
        self._frames: list[pd.DataFrame] = []
        self._keys: list[np.ndarray] = []
        self._pending = 0
        self._threshold = np.inf  # no row with a key at or above it can enter the sample any more

    def add(self, frame: pd.DataFrame) -> None:
        keys = self._rng.random(len(frame))
        keep = keys < self._threshold
        self._frames.append(frame if keep.all() else frame[keep])
        self._keys.append(keys[keep])
        self._pending += int(keep.sum())
        if self._pending > 2 * self.k:
            self._trim()

    def _trim(self) -> None:
        keys = np.concatenate(self._keys) if self._keys else np.empty(0)
        frame = pd.concat(self._frames, ignore_index=True) if self._frames else pd.DataFrame()
        if len(keys) > self.k:
            chosen = np.sort(np.argpartition(keys, self.k - 1)[: self.k])  # stream order kept
            keys, frame = keys[chosen], frame.iloc[chosen].reset_index(drop=True)
            self._threshold = keys.max()
        self._frames, self._keys, self._pending = [frame], [keys], len(keys)

    def result(self) -> pd.DataFrame:
        """The sampled rows, in stream order."""
        self._trim()
        return self._frames[0]


def _arrays(features: Features) -> dict[str, np.ndarray]:
    arrays = {"dense": features.dense, "sparse": features.sparse, "label": features.label}
    arrays.update({f"multi_{k}": v for k, v in features.multi.items()})
    return arrays


def ingest(
    inputs: Iterable[str | Path],
    out_root: str | Path,
    spec: ColumnSpec | None = None,
    config: PreprocessConfig | None = None,
    split: SplitConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Raw files -> a versioned processed dataset under ``out_root`` (reused if it already exists)."""
    from recops.training.stats import save_reference

    spec, config, split = spec or ColumnSpec.criteo(), config or PreprocessConfig(), split or SplitConfig()
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise RecopsError(f"input {p}: no such file; pass existing data files")
    hashes = [file_sha256(p) for p in paths]
    version = version_id(hashes, spec, config, split)
    out_root = Path(out_root)
    final = out_root / version
    if (final / "manifest.json").is_file():
        return Dataset.open(final)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _ingest_into(tmp, paths, hashes, version, spec, config, split, progress, save_reference)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():  # a concurrent ingest of the same version won: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Dataset.open(final)


def _ingest_into(tmp, paths, hashes, version, spec, config, split, progress, save_reference) -> dict[str, Any]:
    preprocessor = Preprocessor(spec, config)
    if config.min_frequency > 0:
        preprocessor = preprocessor.fit(c.frame for p in paths for c in read_chunks(p, spec))
    (tmp / "preprocessor.json").write_text(json.dumps(preprocessor.to_dict()))
    writer = _SplitWriter(tmp)
    rejected: Counter[str] = Counter()
    sample = BottomKSample(split.reference_rows)
    seen = 0
    templates: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    with open(tmp / "rejects.tsv", "w") as rejects_out:
        rejects_out.write("file\tline\treason\trow\n")
        for path in paths:
            for chunk in read_chunks(path, spec):
                for line, reason, text in chunk.rejects:
                    rejected[reason] += 1
                    rejects_out.write(f"{path.name}\t{line}\t{reason}\t{text}\n")
                if chunk.frame.empty:
                    continue
                features = preprocessor.transform(chunk.frame)
                assignment = split.assign(np.arange(seen, seen + len(features)))
                arrays = _arrays(features)
                templates = {k: (v.dtype, v.shape[1:]) for k, v in arrays.items()}
                for code, name in enumerate(SPLITS):
                    index = np.flatnonzero(assignment == code)
                    if len(index):
                        writer.append(name, {k: v[index] for k, v in arrays.items()})
                seen += len(features)
                sample.add(chunk.frame)
                if progress:
                    progress(seen)
    if seen == 0:
        raise RecopsError(
            f"inputs {[str(p) for p in paths]}: no valid rows (rejected: {dict(rejected)}); check the data and --spec"
        )
    rows = writer.finish(templates)
    save_reference(tmp, sample.result(), spec, max_rows=split.reference_rows)
    return {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [{"path": str(p.resolve()), "sha256": h, "bytes": p.stat().st_size} for p, h in zip(paths, hashes)],
        "rows": {"total": seen, **rows},
        "rejected": {**rejected, "total": sum(rejected.values())},  # reasons that occurred (readers.REASONS)
        "rejects_file": "rejects.tsv",
        "schema": spec.to_dict(),
        "preprocess": config.to_dict(),
        "split": asdict(split),
        "table_sizes": preprocessor.table_sizes,
    }
