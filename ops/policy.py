"""When to retrain: drift, quality drop, new labels, model age — one retraining per incident.

Each observation (one evaluation window of the serving model) updates four conditions:

- ``drift``: at least ``drift_min_features`` features drifted in ``drift_windows`` consecutive windows;
- ``quality``: concept drift (the window's AUC drop or logloss rise against the model's baseline, judged once per
  window by :func:`recops.ops.drift.concept_drift` with ``DriftConfig``'s thresholds) in ``quality_windows``
  consecutive windows;
- ``rows``: at least ``min_new_rows`` labelled rows accumulated since the model's training data;
- ``age``: the model is at least ``max_model_age_s`` old.

Debounce: the consecutive-window counts (a window counts once, by its start; a repeated or older
window is ignored, so a restarted loop cannot double count). One incident, one retraining: a firing
trigger latches every condition met at that moment; a latched condition fires again only after it
has cleared, after the model version changes (a new model resets streaks and latches), or after
``retry_after_s`` with the same model (the retraining evidently did not land). Nothing triggers
within ``cooldown_s`` of the previous trigger; conditions rising during the cooldown are latched
with it (same incident). Every decision can be appended to a JSONL log with its inputs and reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.ops.decision import Decision
from recops.ops.online import append_jsonl

CONDITIONS = ("drift", "quality", "rows", "age")


@dataclass(frozen=True)
class PolicyConfig:
    """Trigger thresholds, debounce and cooldown."""

    drift_windows: int = 3
    drift_min_features: int = 1
    quality_windows: int = 2
    min_new_rows: int = 5_000_000
    max_model_age_s: float = 7 * 86_400.0
    cooldown_s: float = 3_600.0
    retry_after_s: float = 86_400.0

    def __post_init__(self) -> None:
        if min(self.drift_windows, self.drift_min_features, self.quality_windows, self.min_new_rows) < 1:
            raise RecopsError(
                "policy config: drift_windows, drift_min_features, quality_windows and min_new_rows must be >= 1"
            )
        if min(self.max_model_age_s, self.cooldown_s, self.retry_after_s) < 0:
            raise RecopsError("policy config: max_model_age_s, cooldown_s and retry_after_s must be >= 0")


@dataclass(frozen=True)
class Observation:
    """What the loop saw for one window of the serving model (None = not measured this time)."""

    ts: float
    model_version: str
    model_trained_at: float
    window: float | None = None  # window start; each window counts once towards the streaks
    drifted_features: tuple[str, ...] | None = None
    concept_drifted: bool | None = None  # the window's quality vs the model's baseline (ops.drift.concept_drift)
    concept_reasons: tuple[str, ...] = ()
    new_labelled_rows: int = 0


@dataclass
class PolicyState:
    """Everything a restarted loop needs to resume."""

    model_version: str | None = None
    last_window: float | None = None
    drift_streak: int = 0
    quality_streak: int = 0
    latched: list[str] = field(default_factory=list)
    last_trigger_ts: float | None = None
    triggers: int = 0


class RetrainPolicy:
    """Turns observations into retrain decisions; see the module docstring for the rules."""

    def __init__(
        self, config: PolicyConfig | None = None, state: PolicyState | None = None, log_path: Path | None = None
    ):
        self.config = config or PolicyConfig()
        self.state = state or PolicyState()
        self.log_path = Path(log_path) if log_path else None

    def _update_streaks(self, obs: Observation, notes: list[str]) -> None:
        s, c = self.state, self.config
        if obs.model_version != s.model_version:
            if s.model_version is not None:
                notes.append(f"model changed {s.model_version} -> {obs.model_version}: streaks and latches reset")
            s.model_version, s.drift_streak, s.quality_streak, s.latched, s.last_window = (
                obs.model_version,
                0,
                0,
                [],
                None,
            )
        if obs.window is not None and s.last_window is not None and obs.window <= s.last_window:
            notes.append(f"window {obs.window} already counted: streaks unchanged")
            return
        if obs.window is not None:
            s.last_window = obs.window
        if obs.drifted_features is not None:
            s.drift_streak = s.drift_streak + 1 if len(obs.drifted_features) >= c.drift_min_features else 0
        if obs.concept_drifted is not None:
            s.quality_streak = s.quality_streak + 1 if obs.concept_drifted else 0
            notes.extend(f"quality: {r}" for r in obs.concept_reasons)

    def _conditions(self, obs: Observation) -> dict[str, tuple[bool, str]]:
        s, c = self.state, self.config
        age = obs.ts - obs.model_trained_at
        drifted = ", ".join(obs.drifted_features or ()) or "none this window"
        return {
            "drift": (
                s.drift_streak >= c.drift_windows,
                f"drift: {s.drift_streak}/{c.drift_windows} consecutive drifted windows ({drifted})",
            ),
            "quality": (
                s.quality_streak >= c.quality_windows,
                f"quality: {s.quality_streak}/{c.quality_windows} consecutive windows below the baseline",
            ),
            "rows": (
                obs.new_labelled_rows >= c.min_new_rows,
                f"rows: {obs.new_labelled_rows}/{c.min_new_rows} new labelled rows",
            ),
            "age": (
                age >= c.max_model_age_s,
                f"age: model {age / 86_400:.2f}/{c.max_model_age_s / 86_400:.2f} days old",
            ),
        }

    def decide(self, obs: Observation) -> Decision:
        """Update the state with ``obs`` and say whether to retrain now (logged when a log path is set)."""
        s, c = self.state, self.config
        notes: list[str] = []
        self._update_streaks(obs, notes)
        conditions = self._conditions(obs)
        met = [k for k in CONDITIONS if conditions[k][0]]
        retry = s.last_trigger_ts is not None and obs.ts - s.last_trigger_ts >= c.retry_after_s
        s.latched = [] if retry else [k for k in s.latched if k in met]  # a cleared condition re-arms
        rising = [k for k in met if k not in s.latched]
        cooldown_left = (s.last_trigger_ts + c.cooldown_s - obs.ts) if s.last_trigger_ts is not None else 0.0
        trigger = bool(rising) and cooldown_left <= 0
        if rising:
            s.latched = met
        if trigger:
            s.last_trigger_ts, s.triggers = obs.ts, s.triggers + 1
            reasons = [conditions[k][1] for k in rising] + (
                ["retry: same model long after the last trigger"] if retry else []
            )
        elif rising:
            reasons = [
                f"cooldown: {cooldown_left:.0f} s left; same incident, not retraining: "
                + "; ".join(conditions[k][1] for k in rising)
            ]
        else:
            reasons = [f"latched (already triggered): {', '.join(s.latched)}"] if s.latched else []
            reasons += [conditions[k][1] for k in CONDITIONS if k not in s.latched]
        decision = Decision(
            "retrain" if trigger else "wait",
            tuple(reasons + notes),
            {"fired": rising if trigger else [], "inputs": {"observation": asdict(obs), "state": asdict(s)}},
        )
        if self.log_path:
            append_jsonl(self.log_path, [{"ts": obs.ts, **decision.to_dict()}])
        return decision

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "state": asdict(self.state)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], log_path: Path | None = None) -> RetrainPolicy:
        try:
            return cls(PolicyConfig(**data["config"]), PolicyState(**data["state"]), log_path)
        except (KeyError, TypeError) as exc:
            raise RecopsError(f"policy state: unreadable ({exc}); expected RetrainPolicy.to_dict() output") from exc
