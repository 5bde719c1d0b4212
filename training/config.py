"""Model and training configuration (plain value types, apart from the modules that use them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from recops.errors import RecopsError

FAMILIES = ("dlrm", "dcn")
EMBEDDING_OPTIMIZERS = ("adagrad", "sgd")
# Sharding types TorchRec 1.8's planner offers for CPU (fbgemm-gpu-cpu); row_wise and table_row_wise need CUDA.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")
SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise")
LR_SCHEDULES = ("constant", "cosine", "step")


def _from_dict(cls: type, data: dict[str, Any], where: str, tuples: tuple[str, ...] = ()) -> Any:
    """``cls(**data)`` with unknown keys reported and list values of ``tuples`` fields made tuples."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise RecopsError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DLRM-family model.

    ``tables`` (feature -> rows, in model order) and ``num_dense`` describe the data: training fills both from the
    dataset, so an architecture alone leaves them empty. DLRM's dot interaction needs every embedding and the
    dense arch's output in one dimension, ``embedding_dim``; ``embedding_dims`` (feature -> dim, or ``"auto"`` for
    ``min(embedding_dim, 6 * rows ** 0.25)`` per table) overrides it per table, and such tables are projected to
    ``embedding_dim`` for the interaction. With no dense column a learned vector takes the dense arch's place.
    """

    tables: dict[str, int] = field(default_factory=dict)
    num_dense: int = 0
    family: str = "dlrm"
    embedding_dim: int = 16
    embedding_dims: dict[str, int] | str = field(default_factory=dict)
    dense_arch: tuple[int, ...] = (64, 32)
    over_arch: tuple[int, ...] = (128, 64)
    dcn_layers: int = 2
    dcn_low_rank: int = 16

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise RecopsError(f"model config: family {self.family!r} is not one of {FAMILIES}")
        if isinstance(self.embedding_dims, str) and self.embedding_dims != "auto":
            raise RecopsError(f"model config: embedding_dims {self.embedding_dims!r} must be 'auto' or feature -> dim")
        dims = self.embedding_dims.values() if isinstance(self.embedding_dims, dict) else ()
        sizes = (self.embedding_dim, *self.dense_arch, *self.over_arch, *dims)
        if any(not isinstance(s, int) or s < 1 for s in sizes) or self.num_dense < 0:
            raise RecopsError("model config: layer sizes and embedding dims must be positive, num_dense >= 0")
        if self.family == "dcn" and (self.dcn_layers < 1 or self.dcn_low_rank < 1):
            raise RecopsError("model config: dcn_layers and dcn_low_rank must be >= 1")

    def dim_of(self, feature: str) -> int:
        """The embedding dimension of ``feature``'s table (after :meth:`for_data`)."""
        dims = self.embedding_dims if isinstance(self.embedding_dims, dict) else {}
        return int(dims.get(feature, self.embedding_dim))

    def for_data(self, tables: dict[str, int], num_dense: int) -> ModelConfig:
        """This architecture completed with a dataset's tables and dense columns (``auto`` dims resolved)."""
        dims = self.embedding_dims
        if dims == "auto":
            dims = {name: min(self.embedding_dim, max(1, round(6 * rows**0.25))) for name, rows in tables.items()}
        unknown = sorted(set(dims) - set(tables))
        if unknown:
            raise RecopsError(
                f"model config: embedding_dims names {unknown}, which are not tables of the dataset "
                f"({', '.join(tables)})"
            )
        return dataclasses.replace(self, tables=dict(tables), num_dense=num_dense, embedding_dims=dims)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model config", tuples=("dense_arch", "over_arch"))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings.

    A run stops when the validation AUC has not improved for ``patience`` epochs (early stopping), or after
    ``epochs``; the defaults let it run until validation stops improving. ``lr_schedule`` scales both learning
    rates per epoch: ``constant``, ``cosine`` (to 0.1x at ``epochs``) or ``step`` (x0.5 every ``lr_step_epochs``).
    """

    epochs: int = 20
    batch_size: int = 2048
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_step_epochs: int = 3
    patience: int = 2
    seed: int = 0
    eval_batch_size: int = 16_384
    sharding_type: str = "table_wise"
    device: str = "auto"
    threads: int = 0
    max_train_rows: int = 0

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise RecopsError(
                f"train config: embedding_optimizer {self.embedding_optimizer!r} not in {list(EMBEDDING_OPTIMIZERS)}"
            )
        if self.sharding_type not in SHARDING_TYPES:
            raise RecopsError(f"train config: sharding_type {self.sharding_type!r} not in {SHARDING_TYPES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RecopsError(f"train config: lr_schedule {self.lr_schedule!r} not in {LR_SCHEDULES}")
        if min(self.epochs, self.batch_size, self.patience, self.lr_step_epochs) < 1 or self.max_train_rows < 0:
            raise RecopsError(
                "train config: epochs, batch_size, patience and lr_step_epochs must be >= 1, max_train_rows >= 0"
            )

    def lr_factor(self, epoch: int) -> float:
        """The learning-rate multiplier of 0-based ``epoch`` under ``lr_schedule``."""
        if self.lr_schedule == "cosine":
            import math

            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(epoch / max(self.epochs - 1, 1), 1.0)))
        if self.lr_schedule == "step":
            return 0.5 ** (epoch // self.lr_step_epochs)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data, "train config")
