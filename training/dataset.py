"""Versioned processed datasets: raw files -> ``<root>/<version>/`` with a manifest and reference stats.

Layout of a version directory::

    manifest.json          version, inputs (sha256), rows per split, rejected per reason, schema,
                           preprocess config, split config
    preprocessor.json      the fitted Preprocessor (spec, config, vocabularies) serving reuses
    stats.json ...         reference statistics per feature (training.stats)
    rejects.tsv            file <TAB> line <TAB> reason <TAB> raw row, in input and line order
    {train,val,test}/      dense.npy float32 [N, D], sparse.npy int64 [N, S], label.npy float32 [N],
                           multi_<name>.npy int64 [N, L]

Same inputs + configs -> same version id and the same files, whichever engine ran it (``engine``: in process,
or Ray tasks over pieces of the inputs): every per-row choice (the random split, the reference sample) hangs on a
hash of the row's file content and line number, and the pieces' outputs are written in input order. The
directory appears whole (temp dir + rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.training.engine import Engine, EngineConfig
from recops.training.hashing import row_keys, source_key
from recops.training.pieces import Piece, plan
from recops.training.preprocess import Features, Preprocessor
from recops.training.readers import Chunk, read_chunks
from recops.training.spec import ColumnSpec, PreprocessConfig, canonical_json
from recops.training.stats import Reference, load_reference, save_reference

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
PREPROCESSOR_FILE = "preprocessor.json"
ROW_KEYS = "fmix64(line * G ^ blake2b(sha256, seed))"  # how rows are split and sampled; part of the version key
_NO_LIMIT = np.uint64(np.iinfo(np.uint64).max)


SPLIT_METHODS = ("random", "column", "time", "files")


@dataclass(frozen=True)
class SplitConfig:
    """How rows become train / val / test; recorded in the manifest.

    - ``random`` (default): ``val_fraction`` / ``test_fraction`` of the rows, each by a seeded hash of its file's
      content and its line number (the same split however the files are read);
    - ``column``: the value of ``column`` in each row, one of train / val / test;
    - ``time``: ``column`` holds times (numbers, or dates such as 2024-05-01); rows before ``val_from`` are train,
      before ``test_from`` val, the rest test;
    - ``files``: separate input files per split (``ingest(..., val_inputs=..., test_inputs=...)``), e.g. the last
      day of the Criteo logs as the test set.

    Rows whose split cannot be read are rejected (``bad_split``). ``reference_rows`` bounds the uniform sample of
    training rows that drift detection compares live data with.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    reference_rows: int = 200_000
    method: str = "random"
    seed: int = 0
    column: str | None = None
    val_from: str | None = None
    test_from: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPLIT_METHODS:
            raise RecopsError(f"split: method {self.method!r} is not one of {SPLIT_METHODS}")
        if not (
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise RecopsError(
                f"split: val and test fractions must be in [0, 1) and leave training rows, got "
                f"{self.val_fraction} and {self.test_fraction}"
            )
        if self.method in ("column", "time") and not self.column:
            raise RecopsError(
                f"split: method {self.method} needs the column holding the split (--split-column) or "
                "the time (--time-column)"
            )
        if self.method == "time" and not (self.val_from and self.test_from):
            raise RecopsError("split: a time split needs both cut points, --val-from and --test-from")

    def assign(self, keys: np.ndarray, values: pd.Series | None = None) -> np.ndarray:
        """0 = train, 1 = val, 2 = test, -1 = unreadable, for rows with uint64 ``keys`` (``hashing.row_keys``; a
        random split) or ``column`` ``values`` (a column or time split)."""
        if self.method == "column":
            return pd.Series(values, dtype="string").map({"train": 0, "val": 1, "test": 2}).fillna(-1).to_numpy(int)
        if self.method == "time":
            times, val_from, test_from = _times(values), _times([self.val_from])[0], _times([self.test_from])[0]
            return np.where(np.isnan(times), -1, np.where(times < val_from, 0, np.where(times < test_from, 1, 2)))
        bucket = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1)
        return np.where(bucket < self.val_fraction, 1, np.where(bucket < self.val_fraction + self.test_fraction, 2, 0))


def _times(values) -> np.ndarray:
    """Numbers as they are, dates as seconds since the epoch; NaN where neither."""
    series = pd.Series(values, dtype="string")
    numbers = pd.to_numeric(series, errors="coerce")
    if numbers.notna().sum() >= series.notna().sum():
        return numbers.to_numpy(np.float64, na_value=np.nan)
    dates = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    seconds = (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return seconds.to_numpy(np.float64, na_value=np.nan)


@dataclass(frozen=True)
class DatasetRef:
    """The identity of a processed dataset version: the root it lives under and its version id."""

    root: Path
    version: str

    @property
    def path(self) -> Path:
        return self.root / self.version

    def to_dict(self) -> dict[str, str]:
        return {"root": str(self.root), "version": self.version}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> DatasetRef:
        return cls(Path(data["root"]), str(data["version"]))


class Dataset:
    """An opened processed dataset version; the only reader of its manifest, schema and preprocessor."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self._manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> Dataset:
        path = Path(path).expanduser().resolve()
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise RecopsError(
                f"dataset {path}: no {MANIFEST_FILE}; pass a version directory made by "
                "`recops data ingest` (<root>/<version>)"
            ) from None
        except (OSError, ValueError) as exc:
            raise RecopsError(f"dataset {path}: {MANIFEST_FILE} is unreadable ({exc}); ingest the data again") from exc
        return cls(path, manifest)

    @classmethod
    def resolve(cls, root: str | Path, version: str = "latest") -> Dataset:
        """Version ``version`` under ``root``; ``latest`` = the most recently created one."""
        root = Path(root).expanduser()
        found = sorted((cls.open(p.parent) for p in root.glob(f"*/{MANIFEST_FILE}")), key=lambda d: d.created)
        if version != "latest":
            match = [d for d in found if d.version == version]
            if not match:
                known = ", ".join(d.version for d in found) or "none"
                raise RecopsError(f"dataset version {version!r} does not exist under {root} (versions there: {known})")
            return match[0]
        if not found:
            raise RecopsError(f"dataset root {root} holds no dataset versions; run `recops data ingest --out {root}`")
        return found[-1]

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(self.path.parent, self.version)

    @property
    def version(self) -> str:
        return self._manifest["version"]

    @property
    def created(self) -> str:
        return self._manifest.get("created", "")

    @property
    def spec(self) -> ColumnSpec:
        return ColumnSpec.from_dict(self._manifest["schema"], source=str(self.path / MANIFEST_FILE))

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self._manifest["preprocess"])

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.preprocessor_dict)

    @property
    def preprocessor_dict(self) -> dict[str, Any]:
        """The fitted preprocessor as written (spec, config, vocabularies): what checkpoints and exports carry."""
        return json.loads((self.path / PREPROCESSOR_FILE).read_text())

    @property
    def table_sizes(self) -> dict[str, int]:
        return dict(self._manifest["table_sizes"])

    @property
    def num_dense(self) -> int:
        return len(self.spec.dense)

    @property
    def rows(self) -> dict[str, int]:
        return dict(self._manifest["rows"])

    @property
    def rejected(self) -> dict[str, int]:
        return dict(self._manifest["rejected"])

    @property
    def engine(self) -> dict[str, Any]:
        """How the ingest ran (engine, workers, pieces, each worker's peak RSS); empty for older versions."""
        return dict(self._manifest.get("engine", {}))

    @property
    def split_config(self) -> dict[str, Any]:
        return dict(self._manifest["split"])

    def summary(self) -> dict[str, Any]:
        """What `recops data ingest --json` reports."""
        return {
            "version": self.version,
            "path": str(self.path),
            "root": str(self.path.parent),
            "rows": self.rows,
            "rejected": self.rejected,
            "split": self.split_config,
        }

    def split(self, name: str) -> Features:
        """Memory-mapped features of one split."""
        if name not in SPLITS:
            raise RecopsError(f"dataset {self.path}: unknown split {name!r}; use one of {SPLITS}")
        d = self.path / name
        load = lambda f: np.load(d / f, mmap_mode="r")  # noqa: E731
        return Features(
            dense=load("dense.npy"),
            sparse=load("sparse.npy"),
            multi={m: load(f"multi_{m}.npy") for m in self.spec.multi_hot},
            label=load("label.npy"),
        )

    def reference(self) -> Reference:
        """The reference statistics drift detection compares live rows with."""
        return load_reference(self.path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def version_id(input_hashes: list[str], spec: ColumnSpec, config: PreprocessConfig, split: SplitConfig) -> str:
    key = canonical_json(
        {
            "inputs": input_hashes,
            "spec": spec.to_dict(),
            "pre": config.to_dict(),
            "split": asdict(split),
            "rows": ROW_KEYS,
        }
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
    """The ``k`` rows with the smallest keys (ties by position), kept in position order.

    With keys hashed from each row's identity (``hashing.row_keys``) this is a uniform sample that depends on the
    rows only, not on how the stream is cut or which process read which part: samples of parts ``merge`` into the
    sample of the whole, and a part need only offer rows with keys at or below the whole's ``threshold``.
    """

    def __init__(self, k: int, threshold: np.uint64 = _NO_LIMIT):
        self.k = k
        self.threshold = threshold  # no row with a larger key can enter the sample any more
        self._frames: list[pd.DataFrame] = []
        self._keys: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._pending = 0

    def add(self, frame: pd.DataFrame, rows: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> None:
        """Offer ``frame``'s ``rows`` with uint64 ``keys`` and distinct int64 ``positions`` (their order in the
        whole stream); only those at or below the threshold are copied."""
        keep = keys <= self.threshold
        if not keep.all():
            rows, keys, positions = rows[keep], keys[keep], positions[keep]
        self._frames.append(frame.take(rows).reset_index(drop=True) if len(rows) < len(frame) else frame)
        self._keys.append(keys)
        self._positions.append(positions)
        self._pending += len(keys)
        if self._pending > self.k + self.k // 4:  # trimmed at 1.25 k rows: memory over sort work
            self._trim()

    def merge(self, other: BottomKSample) -> None:
        for frame, keys, positions in zip(other._frames, other._keys, other._positions):
            self.add(frame, np.arange(len(frame)), keys, positions)

    def _trim(self) -> None:
        if not self._frames:
            return
        keys, positions = np.concatenate(self._keys), np.concatenate(self._positions)
        chosen = np.sort(np.lexsort((positions, keys))[: self.k])
        if len(keys) > self.k:
            self.threshold = keys[chosen].max()
        starts = np.cumsum([0] + [len(f) for f in self._frames])
        parts = np.split(chosen, np.searchsorted(chosen, starts[1:-1]))  # the chosen rows of each frame
        frame = pd.concat([f.take(p - s) for f, p, s in zip(self._frames, parts, starts)], ignore_index=True)
        order = np.argsort(positions[chosen])
        self._frames = [frame.take(order).reset_index(drop=True)]
        self._keys, self._positions = [keys[chosen][order]], [positions[chosen][order]]
        self._pending = len(chosen)

    def result(self) -> pd.DataFrame:
        """The sampled rows, in position order."""
        self._trim()
        return self._frames[0] if self._frames else pd.DataFrame()


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
    val_inputs: Iterable[str | Path] = (),
    test_inputs: Iterable[str | Path] = (),
    engine: EngineConfig | None = None,
) -> Dataset:
    """Raw files -> a versioned processed dataset under ``out_root`` (reused if it already exists).

    ``val_inputs`` / ``test_inputs`` make a split by file (``split.method`` becomes ``files``): ``inputs`` are then
    the training rows only. ``engine``: where the reading, hashing and transforming run (default: this process);
    the result is the same.
    """
    spec, config, split = spec or ColumnSpec.criteo(), config or PreprocessConfig(), split or SplitConfig()
    by_split = {
        "train": [Path(p) for p in inputs],
        "val": [Path(p) for p in val_inputs],
        "test": [Path(p) for p in test_inputs],
    }
    if by_split["val"] or by_split["test"]:
        split = replace(split, method="files")
    elif split.method == "files":
        raise RecopsError("split by file: pass the validation and/or test files (--val-input / --test-input)")
    paths = [p for files in by_split.values() for p in files]
    for p in paths:
        if not p.is_file():
            raise RecopsError(f"input {p}: no such file; pass existing data files")
    with Engine(engine) as run:
        hashes = dict(zip(paths, run.map(_sha256, [(p,) for p in paths])))
        version = version_id(
            [f"{name}:{hashes[p]}" for name, files in by_split.items() for p in files], spec, config, split
        )
        final = Path(out_root) / version
        if (final / MANIFEST_FILE).is_file():
            return Dataset.open(final)
        remove_stale(final.parent)  # the staging directories of killed ingests
        with staging_dir(final) as tmp:
            manifest = _ingest_into(tmp, by_split, hashes, version, spec, config, split, progress, run)
            write_json_atomic(tmp / MANIFEST_FILE, manifest)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / MANIFEST_FILE).is_file():  # a concurrent ingest of the same version won: fine
                    raise
    return Dataset.open(final)


def _sha256(path: Path) -> Iterator[str]:
    yield file_sha256(path)


@dataclass(frozen=True)
class _Source:
    """An input file as its rows' keys see it (keys from its content hash, so they are the same everywhere)."""

    split: str | None  # the split of all its rows (a split by file), or None: the split config's choice
    split_key: np.uint64
    sample_key: np.uint64


@dataclass(frozen=True)
class _Job:
    """What every piece of an ingest needs (pickled into Ray tasks)."""

    spec: ColumnSpec
    preprocessor: Preprocessor
    split: SplitConfig
    sources: tuple[_Source, ...]  # by input ordinal
    block_bytes: int

    @property
    def passthrough(self) -> tuple[str, ...]:
        return (self.split.column,) if self.split.column and self.split.method != "random" else ()


@dataclass
class _Part:
    """What one chunk of a piece gives the writer: arrays per split, the rejects in line order, rows kept."""

    file: str
    arrays: dict[str, dict[str, np.ndarray]]
    rejects: list[tuple[int, str, str]]
    rows: int


def _count_piece(piece: Piece, job: _Job) -> Iterator[dict]:
    """The value counts of one piece (a job: one output), for vocabularies."""
    chunks = read_chunks(piece.path, job.spec, job.block_bytes, span=piece.span)
    yield job.preprocessor.count(c.frame for c in chunks)


def _ingest_piece(piece: Piece, job: _Job, threshold: np.uint64) -> Iterator[_Part | BottomKSample]:
    """Read, validate, split and transform one piece (a job): a part per chunk, then the piece's sample of
    training rows with keys at or below ``threshold``."""
    sample = BottomKSample(job.split.reference_rows, threshold)
    for chunk in read_chunks(piece.path, job.spec, job.block_bytes, passthrough=job.passthrough, span=piece.span):
        yield _part(chunk, piece, job, sample)
    yield sample


def _part(chunk: Chunk, piece: Piece, job: _Job, sample: BottomKSample) -> _Part:
    source, frame, lines = job.sources[piece.ordinal], chunk.frame, chunk.lines
    values = frame[job.split.column] if job.passthrough else None
    if source.split:
        codes = np.full(len(frame), SPLITS.index(source.split))
    else:
        codes = job.split.assign(row_keys(source.split_key, lines), values)
    bad = np.flatnonzero(codes < 0)
    rejects = sorted(chunk.rejects + [(int(lines[i]), "bad_split", str(values.iloc[i])) for i in bad])
    if len(bad):
        keep = codes >= 0
        frame, lines, codes = frame[keep].reset_index(drop=True), lines[keep], codes[keep]
    arrays = _arrays(job.preprocessor.transform(frame)) if len(frame) else {}
    by_split = {}
    for code, name in enumerate(SPLITS):
        index = np.flatnonzero(codes == code)
        if len(index):
            by_split[name] = {k: v[index] for k, v in arrays.items()}
    train = np.flatnonzero(codes == 0)
    positions = lines[train] + (piece.ordinal << 40)  # input order, then line order
    sample.add(frame, train, row_keys(source.sample_key, lines[train]), positions)
    return _Part(piece.path.name, by_split, rejects, len(frame))


class _Sink:
    """The writing side of an ingest: the pieces' outputs in order into the split files and the reject log;
    counts; the pieces' samples merged."""

    def __init__(self, tmp: Path, reference_rows: int, rejects: TextIO, progress: Callable[[int], None] | None):
        self.writer = _SplitWriter(tmp)
        self.rejects, self.progress = rejects, progress
        self.rejected: Counter[str] = Counter()
        self.sample = BottomKSample(reference_rows)
        self.seen = 0
        self.templates: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}

    def take(self, item: _Part | BottomKSample) -> None:
        if isinstance(item, BottomKSample):
            self.sample.merge(item)
            return
        for line, reason, text in item.rejects:
            self.rejected[reason] += 1
            self.rejects.write(f"{item.file}\t{line}\t{reason}\t{text}\n")
        for name, arrays in item.arrays.items():
            self.writer.append(name, arrays)
            self.templates = {k: (v.dtype, v.shape[1:]) for k, v in arrays.items()}
        self.seen += item.rows
        if self.progress and item.rows:
            self.progress(self.seen)


def _ingest_into(
    tmp: Path,
    by_split: dict[str, list[Path]],
    hashes: dict[Path, str],
    version: str,
    spec: ColumnSpec,
    config: PreprocessConfig,
    split: SplitConfig,
    progress: Callable[[int], None] | None,
    engine: Engine,
) -> dict[str, Any]:
    paths = [p for files in by_split.values() for p in files]
    pieces = plan(paths, spec, engine)
    sources = tuple(
        _Source(
            name if split.method == "files" else None,
            source_key(hashes[p], "split", split.seed),
            source_key(hashes[p], "sample", split.seed),
        )
        for name, files in by_split.items()
        for p in files
    )
    job = _Job(spec, Preprocessor(spec, config), split, sources, engine.config.block_bytes)
    if config.min_frequency > 0:  # vocabularies from the training inputs
        train = [(p, job) for p in pieces if p.ordinal < len(by_split["train"])]
        job = replace(job, preprocessor=job.preprocessor.fit_counts(engine.map(_count_piece, train)))
    write_json_atomic(tmp / PREPROCESSOR_FILE, job.preprocessor.to_dict(), indent=None)
    with open(tmp / "rejects.tsv", "w") as rejects:
        rejects.write("file\tline\treason\trow\n")
        sink = _Sink(tmp, split.reference_rows, rejects, progress)
        for item in engine.map(_ingest_piece, ((p, job, sink.sample.threshold) for p in pieces)):
            sink.take(item)
    if sink.seen == 0:
        raise RecopsError(
            f"inputs {[str(p) for p in paths]}: no valid rows (rejected: {dict(sink.rejected)}); "
            "check the data and --spec"
        )
    rows = sink.writer.finish(sink.templates)
    reference = sink.sample.result()
    if reference.empty:
        raise RecopsError(f"inputs {[str(p) for p in paths]}: no training rows ({rows}); check the split")
    save_reference(tmp, reference, spec, max_rows=split.reference_rows)
    return {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": {**engine.describe(), "pieces": len(pieces)},
        "inputs": [
            {"path": str(p.resolve()), "sha256": hashes[p], "bytes": p.stat().st_size, "split": name}
            for name, files in by_split.items()
            for p in files
        ],
        "rows": {"total": sink.seen, **rows},
        "rejected": {**sink.rejected, "total": sum(sink.rejected.values())},  # reasons that occurred
        "rejects_file": "rejects.tsv",
        "schema": spec.to_dict(),
        "preprocess": config.to_dict(),
        "split": asdict(split),
        "table_sizes": job.preprocessor.table_sizes,
    }
