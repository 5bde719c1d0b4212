"""The closed loop's persisted state: the served models, the candidate under way, and the journal of events.

Every step is committed: its events (``{seq, t, kind, reason, ...}``) are appended to ``events.jsonl`` (fsync'ed),
then ``state.json`` is replaced atomically. Events with ``seq`` beyond the state's ``next_seq`` (a crash between
the two writes) belong to a step that will run again and are dropped when the journal is opened.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from recops.errors import RecopsError
from recops.files import write_json_atomic, write_text_atomic

STATE_FILE = "state.json"
CONFIG_FILE = "loop_config.json"  # the configuration of the latest start (read by `recops monitor`)
EVENTS_FILE = "events.jsonl"
DECISIONS_FILE = "decisions.jsonl"
EVENT_KINDS = (
    "window",
    "drift_detected",
    "retrain_started",
    "retrain_finished",
    "validation_passed",
    "validation_failed",
    "exported",
    "canary_started",
    "promoted",
    "rolled_back",
    "error",
)


class Step(str, Enum):
    """Where the loop stands; each step is one stage module's work (see ``recops.ops.loop``)."""

    OBSERVE = "observe"
    RETRAIN = "retrain"
    VALIDATE = "validate"
    PUBLISH = "publish"
    CANARY = "canary"
    WATCH_CANARY = "watch_canary"
    DECIDE_CANARY = "decide_canary"


@dataclass
class ModelRef:
    """A served model: its repository version, registry version, training dataset and checkpoint, and the online
    quality baseline concept drift is measured against (its first window as production, or its canary windows;
    offline validation figures are optimistic, the best epoch being picked on them)."""

    repo_version: int
    registry_version: int | None
    dataset: str
    checkpoint: str
    since_window: int  # first window it served as production
    since_ts: float
    baseline_auc: float | None = None
    baseline_logloss: float | None = None
    baseline_source: str = ""

    def set_baseline(self, auc_value: float | None, logloss_value: float | None, source: str) -> None:
        if auc_value is not None and logloss_value is not None:
            self.baseline_auc, self.baseline_logloss, self.baseline_source = auc_value, logloss_value, source


@dataclass
class Trained:
    """What a retraining produced: a registered model and how it was made."""

    method: str
    registry_version: int
    checkpoint: str
    dataset: str
    dataset_version: str
    rows: dict[str, int]
    metrics: dict[str, float]
    warm_start: str
    train_s: float
    sweep_id: str | None = None

    def event(self) -> dict[str, Any]:
        """The ``retrain_finished`` event."""
        val_auc = self.metrics.get("val_auc")
        reason = (
            f"{self.method} on {self.rows['total']} rows (dataset {self.dataset_version}, {self.warm_start}): "
            f"val AUC {'n/a' if val_auc is None else f'{val_auc:.4f}'}; registered as v{self.registry_version}"
        )
        fields = {"registry_version": self.registry_version, "method": self.method, "warm_start": self.warm_start}
        return event("retrain_finished", reason, **fields, metrics=self.metrics)


@dataclass
class Candidate:
    """The retraining under way, from trigger to promotion or rollback."""

    id: int
    windows: list[int]
    trigger: list[str]
    run_dir: str
    trained: Trained | None = None
    validation: dict[str, Any] | None = None
    repo_version: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        trained = data.get("trained")
        return cls(**{**data, "trained": Trained(**trained) if trained else None})


@dataclass
class LoopState:
    """Everything a restarted loop needs (``state.json``)."""

    production: ModelRef
    start_ts: float
    step: Step = Step.OBSERVE
    next_window: int = 0
    next_seq: int = 0
    canary: ModelRef | None = None
    candidate: Candidate | None = None
    canary_arms: list[dict[str, Any]] = field(default_factory=list)  # per canary window: arm -> metrics
    policy: dict[str, Any] = field(default_factory=dict)
    data_files: dict[str, str] = field(default_factory=dict)  # window index -> labelled rows (relative path)
    retrains: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "step": self.step.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        canary, candidate = data.get("canary"), data.get("candidate")
        return cls(
            **{
                **data,
                "step": Step(data["step"]),
                "production": ModelRef(**data["production"]),
                "canary": ModelRef(**canary) if canary else None,
                "candidate": Candidate.from_dict(candidate) if candidate else None,
            }
        )

    def window_ts(self, index: int, window_s: float) -> float:
        return self.start_ts + index * window_s


def event(kind: str, reason: str, **fields: Any) -> dict[str, Any]:
    """One loop event: its kind (``EVENT_KINDS``), why, and its figures (the journal adds ``seq`` and ``t``)."""
    return {"kind": kind, **fields, "reason": reason}


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None, numpy scalars as Python numbers and paths as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    """The committed events of a loop's state dir (complete lines only)."""
    path = Path(state_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


class Journal:
    """``state.json`` and ``events.jsonl`` of one state dir, written so that a crash anywhere loses no committed
    step and repeats no uncommitted one."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def acquire(self) -> FileLock:
        """The state dir's lock, held by one loop at a time (release it when done)."""
        lock = FileLock(str(self.state_dir / ".loop.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RecopsError(
                f"another loop runs on {self.state_dir}; stop it first (one loop per state dir)"
            ) from None
        return lock

    @property
    def decisions(self) -> Path:
        """The retraining policy's decision log."""
        return self.state_dir / DECISIONS_FILE

    def save_config(self, config: dict[str, Any]) -> None:
        """The configuration of the latest start (what `recops monitor` reads)."""
        write_json_atomic(self.state_dir / CONFIG_FILE, config)

    def load(self) -> LoopState | None:
        """The committed state (None for a new state dir); drops events a crash left uncommitted."""
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = LoopState.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise RecopsError(
                f"loop state {path} is unreadable ({exc}); move the state dir away to start afresh"
            ) from exc
        self._drop_uncommitted(state.next_seq)
        return state

    def commit(self, state: LoopState, *events: dict[str, Any]) -> list[dict[str, Any]]:
        """Append ``events`` (numbered from ``state.next_seq``) to the event log, then save ``state``."""
        stamped = []
        for event in events:
            stamped.append({"seq": state.next_seq, "t": time.time(), **event})
            state.next_seq += 1
        if stamped:
            with open(self.state_dir / EVENTS_FILE, "a") as fh:
                fh.write("".join(json.dumps(jsonable(e)) + "\n" for e in stamped))
                fh.flush()
                os.fsync(fh.fileno())
        write_json_atomic(self.state_dir / STATE_FILE, jsonable(state.to_dict()))
        return stamped

    def _drop_uncommitted(self, next_seq: int) -> None:
        path = self.state_dir / EVENTS_FILE
        if not path.is_file():
            return
        raw = path.read_bytes()
        kept = [e for e in read_events(self.state_dir) if e["seq"] < next_seq]
        if raw.count(b"\n") != len(kept) or not raw.endswith(b"\n") and raw:
            write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
