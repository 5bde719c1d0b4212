"""TorchRec DLRM models: dot interaction (DLRM) and DCNv2 low-rank cross layers (DLRM-DCN).

The sparse path is an ``EmbeddingBagCollection`` fed a ``KeyedJaggedTensor``; everything after the
pooled embeddings is plain torch (``head``), so an export module can reuse it unchanged with plain
gathers in place of the embedding bags.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType
from torchrec.datasets.utils import Batch

from recops.errors import RecopsError
from recops.training.config import ModelConfig


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
        return torch.cat([dense, products.flatten(1).index_select(1, self.pairs)], dim=1)  # backward: index_add


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


class DenseArch(nn.Module):
    """Dense features [B, num_dense] -> [B, embedding_dim]; with no dense feature, a learned vector in its
    place (its dot products with the embeddings act as per-feature linear terms)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.embedding_dim
        self.mlp = mlp([config.num_dense, *config.dense_arch, dim], last_activation=True) if config.num_dense else None
        self.constant = None if config.num_dense else nn.Parameter(torch.zeros(dim).normal_(0, 0.1))

    def forward(self, dense: torch.Tensor, batch: int) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp(dense)
        return self.constant.unsqueeze(0).expand(batch, -1)


class EmbeddingProjection(nn.Module):
    """Pooled embeddings concatenated in model order [B, sum(dims)] -> [B, F, embedding_dim]: a view when every
    table has ``embedding_dim``, else tables of another size pass through their own linear projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.embedding_dim
        self.dims = [config.dim_of(name) for name in config.tables]
        self.uniform = all(d == self.dim for d in self.dims)
        self.project = nn.ModuleDict(
            {str(i): nn.Linear(d, self.dim, bias=False) for i, d in enumerate(self.dims) if d != self.dim}
        )

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return flat.view(-1, len(self.dims), self.dim)
        parts = flat.split(self.dims, dim=1)
        return torch.stack(
            [self.project[str(i)](p) if str(i) in self.project else p for i, p in enumerate(parts)], dim=1
        )


class DLRMHead(nn.Module):
    """Everything after the embedding lookups: (dense [B, num_dense], pooled [B, sum(dims)]) -> logits [B]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, f = config.embedding_dim, len(config.tables)
        self.dense_arch = DenseArch(config)
        self.embeddings = EmbeddingProjection(config)
        if config.family == "dlrm":
            self.interaction: nn.Module = DotInteraction(f)
            width = DotInteraction.output_dim(f, dim)
        else:
            width = LowRankCrossNet.output_dim(f, dim)
            self.interaction = LowRankCrossNet(width, config.dcn_layers, config.dcn_low_rank)
        self.over_arch = mlp([width, *config.over_arch, 1], last_activation=False)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        embedded = self.embeddings(pooled)
        return self.over_arch(self.interaction(self.dense_arch(dense, pooled.shape[0]), embedded)).squeeze(1)


class DLRM(nn.Module):
    """A TorchRec DLRM: ``forward(dense, kjt) -> logits``."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        super().__init__()
        if not config.tables:
            raise RecopsError("model config: no embedding tables; fill `tables` from a dataset's table sizes")
        self.config = config
        self.keys = list(config.tables)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{name}",
                    embedding_dim=config.dim_of(name),
                    num_embeddings=rows,
                    feature_names=[name],
                    pooling=PoolingType.SUM,
                )
                for name, rows in config.tables.items()
            ],
            device=torch.device(device),
        )
        self.head = DLRMHead(config).to(device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(dense, in_key_order(self.ebc(sparse), self.keys))


class DLRMTrain(DLRM):
    """The DLRM as TorchRec's training pipeline runs it: ``forward(batch) -> (loss, (loss, logits))``, the outputs
    detached. Same parameters and state-dict keys as :class:`DLRM`."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        logits = super().forward(batch.dense_features, batch.sparse_features)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


@torch.fx.wrap  # one opaque call when TorchRec's pipeline traces the model: its keys are only known at run time
def in_key_order(pooled: KeyedTensor, keys: list[str]) -> torch.Tensor:
    """Pooled embeddings [B, sum(dims)] in ``keys`` order: a view when the collection returns them so, else one
    column gather (a sharded collection may return features in plan order)."""
    values = pooled.values()
    if pooled.keys() == keys:
        return values
    columns = _columns(tuple(pooled.keys()), tuple(pooled.length_per_key()), tuple(keys), values.device)
    return values.index_select(1, columns)


@functools.lru_cache(maxsize=16)
def _columns(have: tuple[str, ...], dims: tuple[int, ...], want: tuple[str, ...], device: torch.device) -> torch.Tensor:
    """The columns of features ``have`` (of widths ``dims``) that put them in ``want`` order."""
    start = dict(zip(have, itertools.accumulate(dims, initial=0)))
    width = dict(zip(have, dims))
    return torch.cat([torch.arange(start[k], start[k] + width[k]) for k in want]).to(device)


def to_kjt(
    keys: list[str], sparse: np.ndarray | torch.Tensor, multi: dict[str, Any] | None = None
) -> KeyedJaggedTensor:
    """One-hot ids [B, S] (+ padded multi-hot ids [B, L], -1 = pad) -> a KeyedJaggedTensor in ``keys`` order."""
    sparse = torch.as_tensor(np.asarray(sparse) if not isinstance(sparse, torch.Tensor) else sparse, dtype=torch.int64)
    batch = sparse.shape[0]
    values = [sparse.t().reshape(-1)]
    lengths = [torch.ones(sparse.numel(), dtype=torch.int32)]
    for name in keys[sparse.shape[1] :]:
        ids = torch.as_tensor(np.asarray((multi or {})[name]), dtype=torch.int64)
        mask = ids >= 0
        values.append(ids[mask])
        lengths.append(mask.sum(1).to(torch.int32))
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    assert kjt.lengths().numel() == batch * len(keys)
    return kjt
