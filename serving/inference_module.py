"""The exportable twin of ``recops.training.model.DLRM``: plain tensor inputs, stacked-table gathers, the trained head.

Inputs and output follow the contract in ``recops.serving.onnx_model``. Embedding tables of one dimension are one
concatenated matrix; a feature's ids are shifted by its row offset and looked up with one ``Gather`` (no
EmbeddingBag, no jagged tensors, no Loop). The graph guards its inputs the way training saw them: an id outside
its table (negative, or beyond the table) becomes the reserved missing id 0, and a non-finite dense value
becomes 0 (what preprocessing makes of a missing value).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recops.errors import RecopsError
from recops.serving.onnx_model import FeatureLayout
from recops.training.checkpoint import Checkpoint
from recops.training.config import ModelConfig
from recops.training.model import DLRM, DLRMHead, to_kjt

TABLE_PREFIX = "ebc.embedding_bags.t_"


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}


def _valid_ids(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))


class InferenceDLRM(nn.Module):
    """``forward(*inputs)`` in ``layout.input_specs()`` order ``-> probability [B, 1]``, equal to sigmoid(DLRM)."""

    def __init__(self, config: ModelConfig, layout: FeatureLayout, state: dict[str, torch.Tensor], fp16: bool = False):
        super().__init__()
        self.dtype = torch.float16 if fp16 else torch.float32
        self.names = [s.name for s in layout.input_specs()]
        try:
            tables = {name: state[f"{TABLE_PREFIX}{name}.weight"] for name in layout.tables}
        except KeyError as exc:
            raise RecopsError(
                f"checkpoint has no embedding table {exc.args[0]}; it was saved from another model"
            ) from exc
        dims = sorted({t.shape[1] for t in tables.values()})
        groups = {d: [n for n in layout.tables if tables[n].shape[1] == d] for d in dims}
        self.weights = nn.ParameterList(
            nn.Parameter(torch.cat([tables[n] for n in groups[d]]).to(self.dtype), requires_grad=False) for d in dims
        )
        self.place = {}  # feature -> (group, row offset, rows)
        for g, d in enumerate(dims):
            starts = np.concatenate([[0], np.cumsum([tables[n].shape[0] for n in groups[d]])[:-1]])
            self.place.update({n: (g, int(o), tables[n].shape[0]) for n, o in zip(groups[d], starts)})
        self.sparse = list(layout.sparse)
        self.multi = list(layout.multi_hot)
        self.order = list(layout.tables)
        for g in range(len(dims)):
            feats = [n for n in self.sparse if self.place[n][0] == g]
            self.register_buffer(f"offsets_{g}", torch.tensor([self.place[n][1] for n in feats], dtype=torch.int64))
            self.register_buffer(f"rows_{g}", torch.tensor([self.place[n][2] for n in feats], dtype=torch.int64))
        self.head = DLRMHead(config)
        self.head.load_state_dict(head_state(state))
        self.head.to(self.dtype)
        self.eval()

    def _one_hot(self, sparse: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled vectors [B, d] of the one-hot features: one gather per table dimension."""
        out = {}
        for g, weight in enumerate(self.weights):
            feats = [i for i, n in enumerate(self.sparse) if self.place[n][0] == g]
            if not feats:
                continue
            ids = sparse if len(feats) == len(self.sparse) else sparse[:, feats]
            rows = F.embedding(_valid_ids(ids, getattr(self, f"rows_{g}")) + getattr(self, f"offsets_{g}"), weight)
            out.update({self.sparse[i]: rows[:, j] for j, i in enumerate(feats)})
        return out

    def _multi_hot(self, name: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        group, offset, rows = self.place[name]
        vectors = F.embedding(_valid_ids(ids, torch.tensor(rows)) + offset, self.weights[group])  # [B, L, d]
        return (vectors * mask.to(self.dtype).unsqueeze(-1)).sum(dim=1)

    def _uniform(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every table in one dimension: one gather for the one-hot features, stacked with the multi-hot ones."""
        parts = []
        if self.sparse:
            ids = _valid_ids(named["sparse"], self.rows_0) + self.offsets_0
            parts.append(F.embedding(ids, self.weights[0]))  # [B, S, D]
        parts += [self._multi_hot(n, named[f"multi_{n}"], named[f"mask_{n}"]).unsqueeze(1) for n in self.multi]
        stacked = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return stacked.flatten(1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.names, inputs))
        if len(self.weights) == 1:
            flat = self._uniform(named)
        else:
            pooled = self._one_hot(named["sparse"]) if self.sparse else {}
            pooled.update({n: self._multi_hot(n, named[f"multi_{n}"], named[f"mask_{n}"]) for n in self.multi})
            flat = torch.cat([pooled[n] for n in self.order], dim=1)
        dense = named.get("dense")
        dense = torch.nan_to_num(dense, nan=0.0, posinf=0.0, neginf=0.0) if dense is not None else flat[:, :0]
        logits = self.head(dense.to(self.dtype), flat)
        return torch.sigmoid(logits).unsqueeze(1).to(torch.float32)


def load_torchrec(checkpoint: Checkpoint) -> DLRM:
    """The real TorchRec model (EmbeddingBagCollection + KJT) with the checkpoint's weights, for reference."""
    model = DLRM(checkpoint.meta.model)
    model.load_state_dict(checkpoint.load(optim=False).model)
    return model.eval()


@torch.no_grad()
def torchrec_probabilities(
    model: DLRM, layout: FeatureLayout, inputs: dict[str, np.ndarray], batch_size: int = 16384
) -> np.ndarray:
    """sigmoid(DLRM) for contract-named inputs, computed through a KeyedJaggedTensor, as float32 [N, 1]."""
    n = len(next(iter(inputs.values())))
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        rows = min(batch_size, n - start)
        sparse = inputs["sparse"][part] if layout.sparse else np.zeros((rows, 0), np.int64)
        dense = inputs["dense"][part] if layout.num_dense else np.zeros((rows, 0), np.float32)
        kjt = to_kjt(model.keys, sparse, {name: inputs[f"multi_{name}"][part] for name in layout.multi_hot})
        out.append(torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(dense)), kjt)))
    return torch.cat(out).numpy().astype(np.float32).reshape(-1, 1)
