"""The exportable twin of ``training.model.DLRM``: plain tensor inputs, stacked-table gathers, the trained head.

Input contract (shared with ``serving.client.features_to_inputs``), B = batch:

- ``dense``  float32 [B, num_dense]
- ``sparse`` int64 [B, S]: one id per categorical feature, in ``ModelConfig.tables`` order
- per multi-hot feature ``<f>``: ``multi_<f>`` int64 [B, L] ids (-1 = padding) and ``mask_<f>`` float32 [B, L]

Output ``probability`` float32 [B, 1]. All embedding tables are one concatenated matrix; a feature's ids are
shifted by its row offset and looked up with one ``Gather`` (no EmbeddingBag, no jagged tensors, no Loop).
Ids must lie in [0, table rows), as ``training.preprocess.Preprocessor`` guarantees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.errors import RecopsError
from training.model import DLRM, DLRMHead, ModelConfig, to_kjt

OUTPUT_NAME = "probability"
TABLE_PREFIX = "ebc.embedding_bags.t_"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name, shape (-1 = dynamic batch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FeatureLayout:
    """Which tables are one-hot (the ``sparse`` columns) and which multi-hot (with their padded length)."""

    num_dense: int
    tables: dict[str, int]  # feature -> rows, in model order
    sparse: tuple[str, ...]
    multi_hot: dict[str, int]  # feature -> max ids per row

    @classmethod
    def from_trainer(cls, trainer: dict[str, Any]) -> FeatureLayout:
        """From a checkpoint's trainer.json ("model" config + "preprocessor" spec); checks the table order."""
        config = ModelConfig.from_dict(trainer["model"])
        spec = trainer["preprocessor"]["spec"]
        layout = cls(config.num_dense, dict(config.tables), tuple(spec["sparse"]),
                     {k: int(v) for k, v in spec.get("multi_hot", {}).items()})
        expected = [*layout.sparse, *layout.multi_hot]
        if list(layout.tables) != expected:
            raise RecopsError(f"checkpoint tables {list(layout.tables)} are not in the preprocessor's feature order "
                              f"{expected} (categorical then multi-hot); re-train with the dataset's table_sizes")
        return layout

    def input_specs(self) -> tuple[InputSpec, ...]:
        specs = [InputSpec("dense", "float32", (-1, self.num_dense)), InputSpec("sparse", "int64", (-1, len(self.sparse)))]
        for name, length in self.multi_hot.items():
            specs += [InputSpec(f"multi_{name}", "int64", (-1, length)), InputSpec(f"mask_{name}", "float32", (-1, length))]
        return tuple(specs)

    def random_inputs(self, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Valid random inputs: dense like log1p counts, ids inside each table, multi-hot rows of 0..L ids."""
        inputs = {"dense": rng.exponential(1.5, (rows, self.num_dense)).astype(np.float32),
                  "sparse": np.stack([rng.integers(0, self.tables[f], rows) for f in self.sparse], axis=1)
                  if self.sparse else np.zeros((rows, 0), np.int64)}
        for name, length in self.multi_hot.items():
            ids = rng.integers(0, self.tables[name], (rows, length))
            keep = np.arange(length)[None, :] < rng.integers(0, length + 1, (rows, 1))
            inputs[f"multi_{name}"] = np.where(keep, ids, -1).astype(np.int64)
            inputs[f"mask_{name}"] = keep.astype(np.float32)
        return inputs

    def features_inputs(self, dense: np.ndarray, sparse: np.ndarray, multi: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model inputs from ``Features``-style arrays (multi-hot ids -1 padded)."""
        inputs = {"dense": np.ascontiguousarray(dense, np.float32), "sparse": np.ascontiguousarray(sparse, np.int64)}
        for name in self.multi_hot:
            ids = np.ascontiguousarray(multi[name], np.int64)
            inputs[f"multi_{name}"], inputs[f"mask_{name}"] = ids, (ids >= 0).astype(np.float32)
        return inputs


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
