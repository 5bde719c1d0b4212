"""Atomic, resumable checkpoints, written and read sharded with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory holds ``model/`` (the model's state dict) and ``optim/`` (dense and fused embedding optimizer
state), each a DCP checkpoint: ``.metadata`` and one ``__<rank>_0.distcp`` file per rank that holds shards. Every rank
writes its own shards (nothing is gathered to one rank); loading reshards them for any world size, or into plain
tensors in one process (export). ``trainer.json`` holds the configs, the epoch and the metrics, ``files.json`` the
sha256 of every other file (each rank hashes a share). A checkpoint is assembled in a staging directory that is
swapped in whole; every rank must see the same filesystem.

Checkpoints of the old format (unsharded ``model.pt`` and ``optim.pt``) still load into one process;
:meth:`Checkpoint.copy_to` writes them in this format, which sharded loading needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.training.config import ModelConfig, TrainConfig
from recops.training.dataset import Dataset, DatasetRef
from recops.training.preprocess import Preprocessor

MODEL, OPTIM = "model", "optim"  # the DCP checkpoints
LEGACY = {MODEL: "model.pt", OPTIM: "optim.pt"}  # the old format's unsharded files
METADATA = ".metadata"  # DCP's index of a checkpoint's tensors and files
TRAINER_FILE = "trainer.json"
SUMS_FILE = "files.json"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


class _Writer(FileSystemWriter):
    """DCP's file writer without the per-save id and staging path in ``.metadata``: the same state writes the same
    bytes, so :attr:`Checkpoint.fingerprint` identifies content."""

    def storage_meta(self) -> None:
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP's warnings that are no news here: without a process group it assumes one process (as meant), and it
    deprecates the ShardedTensors TorchRec 1.8's sharded modules give (its DTensor output is experimental)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        yield


def _write(state: dict, directory: Path, no_dist: bool = False) -> None:
    with _quiet():
        dcp.save(state, storage_writer=_Writer(directory), no_dist=no_dist)


def _read_plain(directory: Path) -> dict:
    """A DCP checkpoint as (nested) dicts of whole plain tensors, read in this process alone."""
    metadata = FileSystemReader(directory).read_metadata()
    flat = {
        fqn: torch.empty(m.size, dtype=m.properties.dtype)
        for fqn, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with _quiet():
        dcp.load(flat, storage_reader=FileSystemReader(directory), no_dist=True)
    return _unflatten({tuple(metadata.planner_data[fqn]): tensor for fqn, tensor in flat.items()})


def _file_sums(root: Path, rank: int = 0, world: int = 1) -> dict[str, str]:
    """sha256 of this rank's share of the files under ``root`` (relative path -> hex digest)."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return {name: _sha256(root / name) for name in names[rank::world]}


def _on_rank0(obj: Any) -> Any:
    """Collective: rank 0's ``obj`` on every rank."""
    box = [obj]
    if _rank_world()[1] > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _merged(part: dict[str, str]) -> dict[str, str]:
    """Collective: every rank's dict merged, on rank 0 (empty elsewhere)."""
    rank, world = _rank_world()
    if world == 1:
        return part
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return {k: v for p in parts or () for k, v in p.items()}


@dataclass(frozen=True)
class CheckpointMeta:
    """``trainer.json``: what was trained on what, and where training stands (``epoch`` = last finished epoch,
    -1 before the first: a warm start)."""

    model: ModelConfig
    train: TrainConfig
    dataset: DatasetRef
    preprocessor: dict[str, Any]  # Preprocessor.to_dict() of the dataset
    world_size: int = 1
    epoch: int = -1
    best_auc: float = -1.0
    stale: int = 0
    history: tuple[dict[str, Any], ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    warm_start_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "dataset": self.dataset.to_dict(),
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        data = dict(data)
        if "dataset" not in data:  # written before dataset roots were recorded
            data["dataset"] = {"root": "", "version": data.pop("dataset_version")}
        return cls(
            **{
                **data,
                "model": ModelConfig.from_dict(data["model"]),
                "train": TrainConfig.from_dict(data["train"]),
                "dataset": DatasetRef.from_dict(data["dataset"]),
                "history": tuple(data.get("history", ())),
            }
        )

    @property
    def features(self) -> Preprocessor:
        return Preprocessor.from_dict(self.preprocessor)

    def fresh(self, dataset: DatasetRef, train: TrainConfig, warm_start_from: str) -> CheckpointMeta:
        """This model's weights as the start of a new run on ``dataset``: history and early-stopping state reset."""
        return replace(
            self,
            dataset=dataset,
            train=train,
            epoch=-1,
            best_auc=-1.0,
            stale=0,
            history=(),
            metrics={},
            warm_start_from=warm_start_from,
        )


@dataclass
class CheckpointState:
    """A loaded checkpoint's tensors, whole (unsharded); ``optim`` is None unless asked for."""

    model: dict[str, torch.Tensor]
    optim: dict[str, Any] | None


class Checkpoint:
    """A checkpoint directory; the only reader and writer of its files."""

    def __init__(self, path: Path, meta: CheckpointMeta):
        self.path, self.meta = path, meta

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """The checkpoint at ``path`` (its metadata; tensors load with :meth:`load` or :meth:`load_sharded`)."""
        path = Path(path).expanduser().resolve()
        _recover(path)
        if not (path / SUMS_FILE).is_file():
            raise RecopsError(
                f"{path} is not a complete checkpoint (no {SUMS_FILE}); pass <run>/checkpoints/best, "
                "a registered model version, or re-train"
            )
        try:
            return cls(path, CheckpointMeta.from_dict(json.loads((path / TRAINER_FILE).read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecopsError(
                f"checkpoint {path}: {TRAINER_FILE} is unreadable ({type(exc).__name__}: {exc}); "
                "point at a directory written by `recops train` or re-train"
            ) from exc

    @staticmethod
    def exists(path: str | Path) -> bool:
        _recover(Path(path))
        return (Path(path) / SUMS_FILE).is_file()

    @property
    def fingerprint(self) -> str:
        """sha256 of the checksums file: the same for every copy of this checkpoint, and for every save of the same
        state, metadata and world size."""
        return _sha256(self.path / SUMS_FILE)

    @property
    def legacy(self) -> bool:
        """Whether this checkpoint has the old format (unsharded ``model.pt`` and ``optim.pt``)."""
        return LEGACY[MODEL] in self._recorded()

    def _recorded(self) -> dict[str, str]:
        """``files.json``: relative path -> sha256; RecopsError if it is unreadable or lacks a required file."""
        try:
            recorded = json.loads((self.path / SUMS_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise self._unreadable(exc) from exc
        parts = LEGACY.values() if LEGACY[MODEL] in recorded else (f"{MODEL}/{METADATA}", f"{OPTIM}/{METADATA}")
        missing = [name for name in (*parts, TRAINER_FILE) if name not in recorded]
        if missing:
            raise self._unreadable(KeyError(f"{SUMS_FILE} records no {', '.join(missing)}"))
        return recorded

    def _unreadable(self, exc: Exception) -> RecopsError:
        return RecopsError(
            f"checkpoint {self.path}: unreadable or incomplete ({type(exc).__name__}: {exc}); "
            "point at a directory written by `recops train` or re-train"
        )

    def _corrupt(self, names: list[str]) -> str | None:
        """Why the files ``names`` do not match their recorded sha256 (None if they all do)."""
        recorded = self._recorded()
        try:
            bad = [name for name in names if _sha256(self.path / name) != recorded[name]]
        except OSError as exc:
            return str(self._unreadable(exc))
        if not bad:
            return None
        return (
            f"checkpoint {self.path}: {', '.join(bad)} do not match the recorded sha256 (corrupt); "
            "use another checkpoint or re-train"
        )

    def verify(self) -> None:
        """Check every file against its recorded sha256 in this process; RecopsError if one is missing or differs."""
        problem = self._corrupt(sorted(self._recorded()))
        if problem:
            raise RecopsError(problem)

    def load(self, optim: bool = True) -> CheckpointState:
        """Verify every file and load the whole tensors into this process (DCP reshards each into one plain tensor);
        ``optim=False`` skips the optimizer state. Old-format checkpoints load too."""
        self.verify()
        try:
            if self.legacy:
                read = lambda part: torch.load(self.path / LEGACY[part], weights_only=True, map_location="cpu")  # noqa: E731
            else:
                read = lambda part: _read_plain(self.path / part)  # noqa: E731
            return CheckpointState(model=read(MODEL), optim=read(OPTIM) if optim else None)
        except (OSError, ValueError, RuntimeError, KeyError, dcp.CheckpointException) as exc:
            raise self._unreadable(exc) from exc

    def load_sharded(self, model_state: dict, optim_state: dict) -> None:
        """Collective: verify the files (each rank a share) and load the checkpoint into ``model_state`` and
        ``optim_state`` in place: the state dicts of a sharded model and its optimizers, at any world size (DCP
        reads each rank's shards from whichever files hold them)."""
        if self.legacy:
            raise RecopsError(
                f"checkpoint {self.path} has the old unsharded format ({LEGACY[MODEL]}), which loads only into one "
                "process; copy it into the sharded format first (Checkpoint.copy_to, as `recops train` does)"
            )
        rank, world = _rank_world()
        problems = [self._corrupt(sorted(self._recorded())[rank::world])]
        if world > 1:
            mine, problems = problems[0], [None] * world
            dist.all_gather_object(problems, mine)
        for problem in filter(None, problems):
            raise RecopsError(problem)
        try:
            with _quiet():
                dcp.load(model_state, storage_reader=FileSystemReader(self.path / MODEL))
                dcp.load(optim_state, storage_reader=FileSystemReader(self.path / OPTIM))
        except dcp.CheckpointException as exc:
            raise RecopsError(
                f"checkpoint {self.path} does not fit this model ({str(exc).strip().splitlines()[-1][:300]}); "
                "it was saved from a different model: pass --no-resume or another checkpoint"
            ) from exc

    def copy_to(self, dst: str | Path, meta: CheckpointMeta | None = None) -> Checkpoint:
        """A verified copy at ``dst`` (replacing it), optionally with other metadata (:meth:`CheckpointMeta.fresh`);
        an old-format checkpoint is copied into the sharded format."""
        self.verify()
        dst = Path(dst)
        with _staging(dst) as tmp:
            for part in (MODEL, OPTIM):
                if self.legacy:
                    state = torch.load(self.path / LEGACY[part], weights_only=True, map_location="cpu")
                    _write(state, tmp / part, no_dist=True)
                else:
                    shutil.copytree(self.path / part, tmp / part)
            _install(dst, tmp, _file_sums(tmp), meta or self.meta)
        return Checkpoint.open(dst)

    def warm_start_problem(self, dataset: Dataset) -> str | None:
        """Why this model cannot continue training on ``dataset`` (None if it can): its embedding tables and
        preprocessing must be the dataset's."""
        if self.meta.model.tables != dataset.table_sizes:
            return "embedding tables differ from the dataset's"
        if self.meta.preprocessor != dataset.preprocessor_dict:
            return "preprocessing differs from the dataset's"
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _previous(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def _recover(path: Path) -> None:
    """Undo a replacement a crash interrupted: the previous checkpoint moved aside, the new one not yet in place."""
    previous = _previous(path)
    if not path.exists() and (previous / SUMS_FILE).is_file():
        previous.rename(path)


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A new staging directory beside ``path``, removed afterwards unless it was swapped in (stale ones of killed
    writers are removed first)."""
    _recover(path)
    remove_stale(path.parent)
    with staging_dir(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _shared_staging(path: Path) -> Iterator[Path]:
    """Collective: rank 0's :func:`_staging` directory, on every rank."""
    if _rank_world()[0] != 0:
        yield Path(_on_rank0(None))
        return
    with _staging(path) as tmp:
        yield Path(_on_rank0(str(tmp)))


def _install(path: Path, tmp: Path, sums: dict[str, str], meta: CheckpointMeta) -> None:
    """Complete the staging directory ``tmp`` (``sums``: its tensor files' sha256) with ``trainer.json`` and
    ``files.json`` and swap it in at ``path``: the previous checkpoint is moved aside first and restored by
    :func:`_recover` if the swap is cut short."""
    write_json_atomic(tmp / TRAINER_FILE, meta.to_dict())
    write_json_atomic(tmp / SUMS_FILE, dict(sorted({**sums, TRAINER_FILE: _sha256(tmp / TRAINER_FILE)}.items())))
    previous = _previous(path)
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        path.rename(previous)
    tmp.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def save(path: Path, model_state: dict, optim_state: dict, meta: CheckpointMeta) -> Checkpoint | None:
    """Collective: every rank writes its own shards of ``model_state`` and ``optim_state`` (state dicts of sharded
    or plain tensors) into one staging directory and hashes a share of its files; rank 0 records the sums and swaps
    the directory in at ``path``. Returns the checkpoint on rank 0 (None elsewhere)."""
    path = Path(path)
    rank, world = _rank_world()
    with _shared_staging(path) as tmp:
        _write(model_state, tmp / MODEL)
        _write(optim_state, tmp / OPTIM)
        sums = _merged(_file_sums(tmp, rank, world))
        if rank == 0:
            _install(path, tmp, sums, meta)
    return Checkpoint.open(path) if rank == 0 else None
