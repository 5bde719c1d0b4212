"""Configuration of the closed loop (``recops.ops.loop``) and of each of its stages: where it reads, serves and
writes, and how each stage judges."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.ops.drift import DriftConfig
from recops.ops.policy import PolicyConfig
from recops.training.config import TrainConfig


@dataclass(frozen=True)
class ObserveConfig:
    """Where windows come from and are scored, and how they are measured."""

    state_dir: Path
    stream_dir: Path
    repo: Path
    model_name: str
    server_url: str
    metrics_url: str | None = None
    window_s: float = 300.0
    feedback_delay_s: float = 30.0
    drift: DriftConfig = DriftConfig()


@dataclass(frozen=True)
class GateConfig:
    """What a retrained model must show on the holdout of its new dataset."""

    auc_margin: float = 0.01  # candidate AUC >= production AUC - margin
    slice_features: tuple[str, ...] = ("C1", "C2")  # categorical features of the spec; others are skipped
    slice_top: int = 3  # the most frequent values of each slice feature
    slice_min_rows: int = 200
    slice_margin: float = 0.05  # candidate slice AUC >= production slice AUC - margin
    holdout_rows: int = 100_000


@dataclass(frozen=True)
class CanaryConfig:
    """Canary share of keys, how long it runs, and how much worse than production it may look."""

    share: float = 0.1
    windows: int = 1
    auc_margin: float = 0.01
    logloss_margin: float = 0.05  # relative
    drain_s: float = 1.0


@dataclass(frozen=True)
class RetrainConfig:
    """How a triggered retraining trains.

    The incident's windows are the training data: the windows of the streak that fired (drift/quality), else those
    since the production model took over, clamped to ``[min_windows, max_windows]``. ``sweep_config`` (YAML,
    ``recops.training.sweep_config``) is the sweep template when ``use_sweep``: its dataset, storage path, warm
    start and architecture are set per retraining (without it, ``RETRAIN_SWEEP``).
    """

    use_sweep: bool = False
    sweep_config: Path | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, batch_size=512))
    warm_start: bool = True
    min_windows: int = 2
    max_windows: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_windows <= self.max_windows:
            raise RecopsError("retrain config: need 1 <= min_windows <= max_windows")


@dataclass(frozen=True)
class LoopConfig:
    """Where the loop reads, serves and writes, and its policies."""

    state_dir: Path
    stream_dir: Path
    repo: Path
    model_name: str
    server_url: str
    datasets_root: Path | None = None  # new datasets go here; default <state_dir>/datasets
    registry: Path | None = None  # default: the settings' registry
    metrics_url: str | None = None  # Triton's /metrics; default: the recops server recorded for ``repo``
    window_s: float = 300.0
    feedback_delay_s: float = 30.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    canary: CanaryConfig = field(default_factory=CanaryConfig)

    def __post_init__(self) -> None:
        if self.window_s <= 0 or not 0 <= self.feedback_delay_s < self.window_s:
            raise RecopsError(
                f"loop config: need window_s > 0 and 0 <= feedback_delay_s < window_s, got "
                f"{self.window_s}, {self.feedback_delay_s}"
            )
        if not 0 < self.canary.share < 1 or self.canary.windows < 1:
            raise RecopsError(
                f"loop config: canary share must be in (0, 1) and windows >= 1, got "
                f"{self.canary.share}, {self.canary.windows}"
            )

    @property
    def datasets(self) -> Path:
        return Path(self.datasets_root) if self.datasets_root else Path(self.state_dir) / "datasets"

    def observe_config(self) -> ObserveConfig:
        return ObserveConfig(
            Path(self.state_dir),
            Path(self.stream_dir),
            Path(self.repo),
            self.model_name,
            self.server_url,
            self.metrics_url,
            self.window_s,
            self.feedback_delay_s,
            self.drift,
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))
