"""TorchRec DLRM models: dot interaction (DLRM) and DCNv2 low-rank cross layers (DLRM-DCN).

The sparse path is an ``EmbeddingBagCollection`` fed a ``KeyedJaggedTensor``; everything after the
pooled embeddings is plain torch (``head``), so an export module can reuse it unchanged with plain
gathers in place of the embedding bags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from recops.errors import RecopsError

FAMILIES = ("dlrm", "dcn")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DLRM-family model. ``tables`` maps feature name -> rows (in model order); training
    fills it from the dataset's table sizes, so an architecture alone leaves it empty."""

    tables: dict[str, int] = field(default_factory=dict)
    num_dense: int = 13
    family: str = "dlrm"
    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 32)
    over_arch: tuple[int, ...] = (128, 64)
    dcn_layers: int = 2
    dcn_low_rank: int = 16

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise RecopsError(f"model config: family {self.family!r} is not one of {FAMILIES}")
        if self.embedding_dim < 1 or any(s < 1 for s in (*self.dense_arch, *self.over_arch)):
            raise RecopsError("model config: layer sizes and embedding_dim must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        for key in ("dense_arch", "over_arch"):
            if key in data:
                data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecopsError(f"model config: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**data)


def mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DotInteraction(nn.Module):
    """Pairwise dot products of [dense, embeddings] (upper triangle), concatenated to the dense vector."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.triu_indices(num_features + 1, num_features + 1, offset=1)
        self.register_buffer("pairs", rows * (num_features + 1) + cols, persistent=False)  # flat upper triangle

    @staticmethod
    def output_dim(num_features: int, dim: int) -> int:
        return dim + num_features * (num_features + 1) // 2

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), pooled], dim=1)
        products = torch.bmm(combined, combined.transpose(1, 2))
        return torch.cat([dense, products.flatten(1)[:, self.pairs]], dim=1)


class LowRankCrossNet(nn.Module):
    """DCNv2 cross layers: x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l on [dense, embeddings]."""

    def __init__(self, in_features: int, layers: int, low_rank: int):
        super().__init__()
        self.v = nn.ModuleList(nn.Linear(in_features, low_rank, bias=False) for _ in range(layers))
        self.w = nn.ModuleList(nn.Linear(low_rank, in_features) for _ in range(layers))

    @staticmethod
    def output_dim(num_features: int, dim: int) -> int:
        return dim * (num_features + 1)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense, pooled.flatten(1)], dim=1)
        x = x0
        for v, w in zip(self.v, self.w):
            x = x0 * w(v(x)) + x
        return x


class DLRMHead(nn.Module):
    """Dense arch + interaction + over arch: (dense [B, 13], pooled [B, F, D]) -> logits [B]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, f = config.embedding_dim, len(config.tables)
        self.dense_arch = mlp([config.num_dense, *config.dense_arch, dim], last_activation=True)
        if config.family == "dlrm":
            self.interaction: nn.Module = DotInteraction(f)
            width = DotInteraction.output_dim(f, dim)
        else:
            width = LowRankCrossNet.output_dim(f, dim)
            self.interaction = LowRankCrossNet(width, config.dcn_layers, config.dcn_low_rank)
        self.over_arch = mlp([width, *config.over_arch, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.over_arch(self.interaction(self.dense_arch(dense), pooled)).squeeze(1)


class DLRM(nn.Module):
    """A TorchRec DLRM: ``forward(dense, kjt) -> logits``."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        super().__init__()
        if not config.tables:
            raise RecopsError("model config: no embedding tables; fill `tables` from a dataset's table sizes")
        self.config = config
        self.keys = list(config.tables)
        self._orders: dict[tuple[str, ...], torch.Tensor] = {}
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{name}", embedding_dim=config.embedding_dim, num_embeddings=rows,
                    feature_names=[name], pooling=PoolingType.SUM,
                )
                for name, rows in config.tables.items()
            ],
            device=torch.device(device),
        )
        self.head = DLRMHead(config).to(device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse)
        stacked = pooled.values().view(-1, len(self.keys), self.config.embedding_dim)  # no per-key copies
        if pooled.keys() != self.keys:  # a sharded collection may return features in plan order
            stacked = stacked[:, self._order(tuple(pooled.keys()), stacked.device)]
        return self.head(dense, stacked)

    def _order(self, keys: tuple[str, ...], device: torch.device) -> torch.Tensor:
        if keys not in self._orders:
            self._orders[keys] = torch.tensor([keys.index(k) for k in self.keys], device=device)
        return self._orders[keys]


def to_kjt(keys: list[str], sparse: np.ndarray | torch.Tensor, multi: dict[str, Any] | None = None) -> KeyedJaggedTensor:
    """One-hot ids [B, S] (+ padded multi-hot ids [B, L], -1 = pad) -> a KeyedJaggedTensor in ``keys`` order."""
    sparse = torch.as_tensor(np.asarray(sparse) if not isinstance(sparse, torch.Tensor) else sparse, dtype=torch.int64)
    batch = sparse.shape[0]
    values = [sparse.t().reshape(-1)]
    lengths = [torch.ones(sparse.numel(), dtype=torch.int32)]
    for name in keys[sparse.shape[1]:]:
        ids = torch.as_tensor(np.asarray((multi or {})[name]), dtype=torch.int64)
        mask = ids >= 0
        values.append(ids[mask])
        lengths.append(mask.sum(1).to(torch.int32))
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    assert kjt.lengths().numel() == batch * len(keys)
    return kjt
