"""Atomic, resumable checkpoints that load unsharded.

A checkpoint directory holds ``model.pt`` (full, unsharded state dict of plain tensors),
``optim.pt`` (dense and fused embedding optimizer state, unsharded), ``trainer.json`` (step, epoch,
configs, metrics) and ``files.json`` (sha256 of each file). Sharded tensors are gathered to rank 0
on save and scattered back into each rank's local shards on load. Everything loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recops.errors import RecopsError
from recops.files import remove_stale, staging_dir, write_json_atomic
from recops.training.config import ModelConfig, TrainConfig
from recops.training.dataset import Dataset, DatasetRef
from recops.training.preprocess import Preprocessor


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _flatten(tree: Any, path: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flatten(value, (*path, key)).items()}
    return {path: tree}


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _local_piece(leaf: Any) -> Any:
    if isinstance(leaf, ShardedTensor):
        shards = [(s.metadata.shard_offsets, s.tensor.detach().cpu().clone()) for s in leaf.local_shards()]
        return ("sharded", tuple(leaf.size()), leaf.dtype, shards)
    if isinstance(leaf, torch.Tensor):
        return ("tensor", leaf.detach().cpu().clone())
    return ("value", leaf)


def gather_full(tree: dict) -> dict | None:
    """Collective: every rank's (possibly different) nested dict of ShardedTensors, tensors and values
    becomes one unsharded nested dict on rank 0 (None on other ranks)."""
    local = {path: _local_piece(leaf) for path, leaf in _flatten(tree).items()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        parts = [local]
    else:
        parts = [None] * dist.get_world_size() if _rank() == 0 else None
        dist.gather_object(local, parts, dst=0)
        if _rank() != 0:
            return None
    full: dict[tuple, Any] = {}
    for part in parts:
        for path, piece in part.items():
            if piece[0] == "sharded":
                _, size, dtype, shards = piece
                target = full.setdefault(path, torch.zeros(size, dtype=dtype))
                for offsets, tensor in shards:
                    target[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
            else:
                full.setdefault(path, piece[1])
    return _unflatten(full)


def scatter_full(target: Any, full: Any, where: str = "") -> None:
    """Copy full tensors into ``target`` in place: local shards of ShardedTensors, whole plain tensors."""
    if isinstance(target, dict):
        for key, value in target.items():
            if key not in full:
                raise RecopsError(f"checkpoint lacks {where}{key}; it was saved from a different model")
            scatter_full(value, full[key], f"{where}{key}.")
        return
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            shard.tensor.copy_(full[index])
    elif isinstance(target, torch.Tensor):
        if target.shape != full.shape:
            raise RecopsError(
                f"checkpoint tensor {where[:-1]} has shape {tuple(full.shape)}, model expects {tuple(target.shape)}"
            )
        target.copy_(full)


TRAINER_FILE = "trainer.json"
FILES = ("model.pt", "optim.pt", TRAINER_FILE)
SUMS_FILE = "files.json"


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
    """A loaded checkpoint's tensors (unsharded)."""

    model: dict[str, torch.Tensor]
    optim: dict[str, Any]


class Checkpoint:
    """A checkpoint directory; the only reader and writer of its files."""

    def __init__(self, path: Path, meta: CheckpointMeta):
        self.path, self.meta = path, meta

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """The checkpoint at ``path`` (its metadata; tensors load with :meth:`load`)."""
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
        """sha256 of the checksums file: the same for every copy of this checkpoint."""
        return _sha256(self.path / SUMS_FILE)

    def verify(self) -> None:
        """Check every file against its recorded sha256; RecopsError if one is missing or differs."""
        try:
            expected = json.loads((self.path / SUMS_FILE).read_text())
            bad = [name for name in FILES if _sha256(self.path / name) != expected[name]]
        except (OSError, KeyError, ValueError) as exc:
            raise RecopsError(
                f"checkpoint {self.path}: unreadable or incomplete ({type(exc).__name__}: {exc}); "
                "point at a directory written by `recops train` or re-train"
            ) from exc
        if bad:
            raise RecopsError(
                f"checkpoint {self.path}: {', '.join(bad)} do not match the recorded sha256 (corrupt); "
                "use another checkpoint or re-train"
            )

    def load(self) -> CheckpointState:
        """Verify every file against its recorded sha256 and load the tensors; RecopsError if corrupt."""
        self.verify()
        try:
            return CheckpointState(
                model=torch.load(self.path / "model.pt", weights_only=True, map_location="cpu"),
                optim=torch.load(self.path / "optim.pt", weights_only=True, map_location="cpu"),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise RecopsError(
                f"checkpoint {self.path}: unreadable or incomplete ({type(exc).__name__}: {exc}); "
                "point at a directory written by `recops train` or re-train"
            ) from exc

    def copy_to(self, dst: str | Path, meta: CheckpointMeta | None = None) -> Checkpoint:
        """A verified copy at ``dst`` (replacing it), optionally with other metadata (:meth:`CheckpointMeta.fresh`)."""
        self.verify()

        def fill(tmp: Path) -> None:
            for name in FILES[:2]:
                shutil.copyfile(self.path / name, tmp / name)

        _install(Path(dst), fill, meta or self.meta)
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


def _install(path: Path, fill: Callable[[Path], None], meta: CheckpointMeta) -> None:
    """Write a whole checkpoint at ``path`` atomically: ``fill`` writes the tensor files into a staging directory,
    then it is swapped in (the previous one is moved aside first and restored by :func:`_recover` if the swap is
    cut short)."""
    _recover(path)
    remove_stale(path.parent)
    with staging_dir(path) as tmp:
        fill(tmp)
        write_json_atomic(tmp / TRAINER_FILE, meta.to_dict())
        write_json_atomic(tmp / SUMS_FILE, {f: _sha256(tmp / f) for f in FILES})
        previous = _previous(path)
        shutil.rmtree(previous, ignore_errors=True)
        if path.exists():
            path.rename(previous)
        tmp.rename(path)
        shutil.rmtree(previous, ignore_errors=True)


def save(path: Path, model_state: dict, optim_state: dict, meta: CheckpointMeta) -> Checkpoint | None:
    """Collective: gather on rank 0 and write ``path`` atomically. Returns the checkpoint on rank 0."""
    model_full, optim_full = gather_full(model_state), gather_full(optim_state)
    if _rank() != 0:
        return None

    def fill(tmp: Path) -> None:
        torch.save(model_full, tmp / "model.pt")
        torch.save(optim_full, tmp / "optim.pt")

    _install(Path(path), fill, meta)
    return Checkpoint.open(path)
