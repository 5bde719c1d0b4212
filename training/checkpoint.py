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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recops.errors import RecopsError

FILES = ("model.pt", "optim.pt", "trainer.json")


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
            raise RecopsError(f"checkpoint tensor {where[:-1]} has shape {tuple(full.shape)}, model expects {tuple(target.shape)}")
        target.copy_(full)


@dataclass
class Checkpoint:
    """A loaded checkpoint (unsharded)."""

    path: Path
    model: dict[str, torch.Tensor]
    optim: dict[str, Any]
    trainer: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(path: Path, model_state: dict, optim_state: dict, trainer: dict[str, Any]) -> Path | None:
    """Collective: gather on rank 0 and write ``path`` atomically (temp dir + rename). Returns path on rank 0."""
    model_full, optim_full = gather_full(model_state), gather_full(optim_state)
    if _rank() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(model_full, tmp / "model.pt")
    torch.save(optim_full, tmp / "optim.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, default=str))
    (tmp / "files.json").write_text(json.dumps({f: _sha256(tmp / f) for f in FILES}))
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint; a missing, truncated or corrupt one raises RecopsError."""
    path = Path(path)
    try:
        expected = json.loads((path / "files.json").read_text())
        for name in FILES:
            if _sha256(path / name) != expected[name]:
                raise RecopsError(f"checkpoint {path}: {name} does not match its recorded sha256 (corrupt)")
        return Checkpoint(
            path=path,
            model=torch.load(path / "model.pt", weights_only=True, map_location="cpu"),
            optim=torch.load(path / "optim.pt", weights_only=True, map_location="cpu"),
            trainer=json.loads((path / "trainer.json").read_text()),
        )
    except RecopsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise RecopsError(
            f"checkpoint {path}: unreadable or incomplete ({type(exc).__name__}: {exc}); "
            "point at a directory written by `recops train` or re-train"
        ) from exc
