"""The exportable twin of ``recops.training.model.DLRM``: plain tensor inputs, stacked-table gathers, the trained head.

Inputs and output follow the contract in ``recops.serving.onnx_model``. All embedding tables are one concatenated
matrix; a feature's ids are shifted by its row offset and looked up with one ``Gather`` (no EmbeddingBag,
no jagged tensors, no Loop). Ids must lie in [0, table rows), as ``recops.training.preprocess.Preprocessor`` guarantees.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recops.serving.onnx_model import FeatureLayout
from recops.errors import RecopsError
from recops.training.model import DLRM, DLRMHead, ModelConfig, to_kjt

TABLE_PREFIX = "ebc.embedding_bags.t_"


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}


class InferenceDLRM(nn.Module):
    """``forward(dense, sparse, multi_<f>, mask_<f>, ...) -> probability [B, 1]`` equal to sigmoid(DLRM)."""

    def __init__(self, config: ModelConfig, layout: FeatureLayout, state: dict[str, torch.Tensor], fp16: bool = False):
        super().__init__()
        dtype = torch.float16 if fp16 else torch.float32
        try:
            tables = [state[f"{TABLE_PREFIX}{name}.weight"] for name in layout.tables]
        except KeyError as exc:
            raise RecopsError(f"checkpoint has no embedding table {exc.args[0]}; it was saved from another model") from exc
        offsets = np.concatenate([[0], np.cumsum([t.shape[0] for t in tables])[:-1]]).tolist()
        self.weight = nn.Parameter(torch.cat(tables).to(dtype), requires_grad=False)
        self.register_buffer("sparse_offsets", torch.tensor(offsets[:len(layout.sparse)], dtype=torch.int64))
        self.multi_offsets = offsets[len(layout.sparse):]
        self.head = DLRMHead(config)
        self.head.load_state_dict(head_state(state))
        self.head.to(dtype)
        self.dtype = dtype
        self.eval()

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, *multi: torch.Tensor) -> torch.Tensor:
        pooled = [F.embedding(sparse + self.sparse_offsets, self.weight)]  # [B, S, D]
        for i, offset in enumerate(self.multi_offsets):
            ids, mask = multi[2 * i], multi[2 * i + 1]
            rows = F.embedding(ids.clamp(min=0) + offset, self.weight)  # [B, L, D]
            pooled.append((rows * mask.to(self.dtype).unsqueeze(-1)).sum(dim=1, keepdim=True))
        logits = self.head(dense.to(self.dtype), torch.cat(pooled, dim=1))
        return torch.sigmoid(logits).unsqueeze(1).to(torch.float32)


def load_torchrec(trainer: dict[str, Any], state: dict[str, torch.Tensor]) -> DLRM:
    """The real TorchRec model (EmbeddingBagCollection + KJT) with the checkpoint's weights, for reference."""
    model = DLRM(ModelConfig.from_dict(trainer["model"]))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def torchrec_probabilities(model: DLRM, inputs: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """sigmoid(DLRM) for contract-named inputs, computed through a KeyedJaggedTensor, as float32 [N, 1]."""
    multi_names = model.keys[inputs["sparse"].shape[1]:]
    out = []
    for start in range(0, len(inputs["dense"]), batch_size):
        part = slice(start, start + batch_size)
        multi = {name: inputs[f"multi_{name}"][part] for name in multi_names}
        kjt = to_kjt(model.keys, inputs["sparse"][part], multi)
        out.append(torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(inputs["dense"][part])), kjt)))
    return torch.cat(out).numpy().astype(np.float32).reshape(-1, 1)
