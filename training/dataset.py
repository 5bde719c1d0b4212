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
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.training.preprocess import Features, Preprocessor
from recops.training.readers import read_chunks
from recops.training.spec import ColumnSpec, PreprocessConfig, canonical_json
from recops.training.stats import Reference, load_reference, save_reference

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.json"
PREPROCESSOR_FILE = "preprocessor.json"
_MULT = 2654435761


SPLIT_METHODS = ("random", "column", "time", "files")


@dataclass(frozen=True)
class SplitConfig:
    """How rows become train / val / test; recorded in the manifest.

    - ``random`` (default): a seeded pseudo-random assignment by row index, ``val_fraction`` / ``test_fraction``;
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

    def assign(self, index: np.ndarray, values: pd.Series | None = None) -> np.ndarray:
        """0 = train, 1 = val, 2 = test, -1 = unreadable, for rows with global valid-row ``index`` (and the
        ``column`` values of a column or time split)."""
        if self.method == "column":
            return pd.Series(values, dtype="string").map({"train": 0, "val": 1, "test": 2}).fillna(-1).to_numpy(int)
        if self.method == "time":
            times, val_from, test_from = _times(values), _times([self.val_from])[0], _times([self.test_from])[0]
            return np.where(np.isnan(times), -1, np.where(times < val_from, 0, np.where(times < test_from, 1, 2)))
        mixed = index.astype(np.uint64) * np.uint64(_MULT) + np.uint64(self.seed * 7919)
        bucket = (mixed % np.uint64(10_000)).astype(np.int64) / 10_000
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
    val_inputs: Iterable[str | Path] = (),
    test_inputs: Iterable[str | Path] = (),
) -> Dataset:
    """Raw files -> a versioned processed dataset under ``out_root`` (reused if it already exists).

    ``val_inputs`` / ``test_inputs`` make a split by file (``split.method`` becomes ``files``): ``inputs`` are then
    the training rows only.
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
    hashes = {p: file_sha256(p) for p in paths}
    version = version_id(
        [f"{name}:{hashes[p]}" for name, files in by_split.items() for p in files], spec, config, split
    )
    final = Path(out_root) / version
    if (final / MANIFEST_FILE).is_file():
        return Dataset.open(final)
    remove_stale(final.parent)  # the staging directories of killed ingests
    with staging_dir(final) as tmp:
        manifest = _ingest_into(tmp, by_split, hashes, version, spec, config, split, progress)
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():  # a concurrent ingest of the same version won: fine
                raise
    return Dataset.open(final)


class _Ingest:
    """One ingest's running state: the split writer, reject log and counts, the reference sample."""

    def __init__(
        self,
        tmp: Path,
        spec: ColumnSpec,
        preprocessor: Preprocessor,
        split: SplitConfig,
        progress: Callable[[int], None] | None,
    ):
        self.spec, self.preprocessor, self.split, self.progress = spec, preprocessor, split, progress
        self.writer = _SplitWriter(tmp)
        self.rejected: Counter[str] = Counter()
        self.sample = BottomKSample(split.reference_rows)
        self.seen = 0
        self.templates: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}

    def add(self, path: Path, fixed: str | None, rejects: TextIO) -> None:
        """Every row of ``path``: into split ``fixed``, or the one the split config assigns."""
        extra = (self.split.column,) if self.split.column and self.split.method != "random" else ()
        for chunk in read_chunks(path, self.spec, passthrough=extra):
            for line, reason, text in chunk.rejects:
                self._reject(rejects, path, line, reason, text)
            if chunk.frame.empty:
                continue
            values = chunk.frame[self.split.column] if extra else None
            codes = (
                np.full(len(chunk.frame), SPLITS.index(fixed))
                if fixed
                else self.split.assign(np.arange(self.seen, self.seen + len(chunk.frame)), values)
            )
            for row in np.flatnonzero(codes < 0):
                self._reject(rejects, path, int(chunk.lines[row]), "bad_split", str(values.iloc[row]))
            self._write(chunk.frame[codes >= 0].reset_index(drop=True), codes[codes >= 0])

    def _reject(self, out: TextIO, path: Path, line: int, reason: str, text: str) -> None:
        self.rejected[reason] += 1
        out.write(f"{path.name}\t{line}\t{reason}\t{text}\n")

    def _write(self, frame: pd.DataFrame, codes: np.ndarray) -> None:
        if frame.empty:
            return
        arrays = _arrays(self.preprocessor.transform(frame))
        self.templates = {k: (v.dtype, v.shape[1:]) for k, v in arrays.items()}
        for code, name in enumerate(SPLITS):
            index = np.flatnonzero(codes == code)
            if len(index):
                self.writer.append(name, {k: v[index] for k, v in arrays.items()})
        self.sample.add(frame[codes == 0])
        self.seen += len(frame)
        if self.progress:
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
) -> dict[str, Any]:
    preprocessor = Preprocessor(spec, config)
    if config.min_frequency > 0:  # vocabularies from the training inputs
        preprocessor = preprocessor.fit(c.frame for p in by_split["train"] for c in read_chunks(p, spec))
    write_json_atomic(tmp / PREPROCESSOR_FILE, preprocessor.to_dict(), indent=None)
    run = _Ingest(tmp, spec, preprocessor, split, progress)
    with open(tmp / "rejects.tsv", "w") as rejects:
        rejects.write("file\tline\treason\trow\n")
        for name, files in by_split.items():
            for path in files:
                run.add(path, name if split.method == "files" else None, rejects)
    paths = [p for files in by_split.values() for p in files]
    if run.seen == 0:
        raise RecopsError(
            f"inputs {[str(p) for p in paths]}: no valid rows (rejected: {dict(run.rejected)}); "
            "check the data and --spec"
        )
    rows = run.writer.finish(run.templates)
    reference = run.sample.result()
    if reference.empty:
        raise RecopsError(f"inputs {[str(p) for p in paths]}: no training rows ({rows}); check the split")
    save_reference(tmp, reference, spec, max_rows=split.reference_rows)
    return {
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [
            {"path": str(p.resolve()), "sha256": hashes[p], "bytes": p.stat().st_size, "split": name}
            for name, files in by_split.items()
            for p in files
        ],
        "rows": {"total": run.seen, **rows},
        "rejected": {**run.rejected, "total": sum(run.rejected.values())},  # reasons that occurred
        "rejects_file": "rejects.tsv",
        "schema": spec.to_dict(),
        "preprocess": config.to_dict(),
        "split": asdict(split),
        "table_sizes": preprocessor.table_sizes,
    }
