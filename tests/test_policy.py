"""Retrain policy: triggers, debounce, cooldown, one retraining per incident, resumable state, decision log."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from recops.errors import RecopsError
from recops.ops.drift import DriftConfig, concept_drift, detect_drift
from recops.ops.policy import Observation, PolicyConfig, RetrainPolicy
from recops.training.spec import ColumnSpec
from recops.training.stats import load_reference, save_reference
from recops.training.synth import SynthConfig, generate, to_table

DAY = 86_400.0
CONFIG = PolicyConfig(
    drift_windows=3, quality_windows=2, min_new_rows=1_000, max_model_age_s=7 * DAY, cooldown_s=600, retry_after_s=DAY
)


def obs(
    window: int, drifted: tuple[str, ...] | None = (), model: str = "1", trained_at: float = 0.0, **kw
) -> Observation:
    """One 60 s window, starting at ``window * 60``."""
    return Observation(
        ts=window * 60.0 + 60,
        model_version=model,
        model_trained_at=trained_at,
        window=window * 60.0,
        drifted_features=drifted,
        **kw,
    )


def quality(window_auc: float, window_logloss: float, positives: int, negatives: int) -> dict:
    """A window's concept-drift verdict against a 0.80 AUC / 0.45 logloss baseline, as the loop computes it."""
    verdict = concept_drift(window_auc, window_logloss, 0.80, 0.45, DriftConfig(), positives, negatives)
    return {"concept_drifted": verdict.drifted, "concept_reasons": tuple(verdict.reasons)}


def run(policy: RetrainPolicy, observations: list[Observation]) -> list[int]:
    """Indices of the observations that triggered a retraining."""
    return [i for i, o in enumerate(observations) if policy.decide(o).verdict == "retrain"]


def test_drift_needs_consecutive_windows_and_fires_once_per_incident() -> None:
    policy = RetrainPolicy(CONFIG)
    d = ("I1", "C2")
    pattern = [d, d, (), d, d, d, d, d, None, d, (), ()]  # None: no drift report, streak unchanged
    assert run(policy, [obs(i, p) for i, p in enumerate(pattern)]) == [5]
    assert policy.state.triggers == 1 and policy.state.latched == [] and policy.state.drift_streak == 0


def test_repeated_windows_count_once() -> None:
    policy = RetrainPolicy(CONFIG)
    decisions = [policy.decide(obs(0, ("I1",))) for _ in range(5)]
    assert not any(d.verdict == "retrain" for d in decisions) and policy.state.drift_streak == 1
    assert any("already counted" in r for r in decisions[-1].reasons)


def test_cooldown_suppresses_a_second_trigger_of_the_same_incident_and_reset_on_new_model() -> None:
    policy = RetrainPolicy(CONFIG)
    d = ("I1",)
    assert run(policy, [obs(i, d) for i in range(3)]) == [2]
    during = policy.decide(obs(3, d, new_labelled_rows=5_000))  # labels pile up while retraining runs
    assert (
        during.verdict == "wait"
        and "cooldown" in during.reasons[0]
        and sorted(policy.state.latched) == ["drift", "rows"]
    )
    after = policy.decide(obs(20, d, new_labelled_rows=6_000))  # cooldown over, same incident still latched
    assert after.verdict == "wait" and after.reasons[0].startswith("latched")
    fresh = policy.decide(obs(21, (), model="2", trained_at=21 * 60.0))  # the retrained model is serving
    assert (
        fresh.verdict == "wait"
        and policy.state.latched == []
        and any("model changed 1 -> 2" in r for r in fresh.reasons)
    )
    assert run(policy, [obs(i, d, model="2", trained_at=21 * 60.0) for i in range(22, 25)]) == [2]  # a new incident


def test_a_cleared_condition_rearms() -> None:
    policy = RetrainPolicy(CONFIG)
    assert run(
        policy, [obs(i, ("C1",)) for i in range(3)] + [obs(3, ())] + [obs(i, ("C1",)) for i in range(20, 23)]
    ) == [2, 6]


def test_quality_drop_triggers_after_consecutive_windows_and_small_windows_are_not_judged() -> None:
    policy = RetrainPolicy(CONFIG)
    good, bad = quality(0.795, 0.45, 2_000, 8_000), quality(0.76, 0.45, 2_000, 8_000)
    tiny = quality(0.70, 0.45, 5, 20)  # AUC standard error ~0.12: no verdict
    windows = [good, bad, tiny, good, bad, bad, bad]
    assert run(policy, [obs(i, None, **w) for i, w in enumerate(windows)]) == [5]
    decision = policy.decide(obs(30, None, **quality(0.70, 0.55, 2_000, 8_000)))
    assert decision.verdict == "wait" and any("logloss" in r for r in decision.reasons)  # latched: same incident


def test_rows_age_and_retry_after() -> None:
    policy = RetrainPolicy(CONFIG)
    assert policy.decide(obs(0, None, new_labelled_rows=999)).verdict == "wait"
    rows = policy.decide(obs(1, None, new_labelled_rows=1_000))
    assert (
        rows.verdict == "retrain"
        and rows.details["fired"] == ["rows"]
        and rows.reasons == ("rows: 1000/1000 new labelled rows",)
    )
    old = RetrainPolicy(CONFIG)
    t0 = 8 * DAY
    assert old.decide(Observation(ts=t0, model_version="1", model_trained_at=0.0)).details["fired"] == ["age"]
    assert old.decide(Observation(ts=t0 + DAY / 2, model_version="1", model_trained_at=0.0)).verdict == "wait"
    retry = old.decide(Observation(ts=t0 + DAY, model_version="1", model_trained_at=0.0))
    assert retry.verdict == "retrain" and any(r.startswith("retry") for r in retry.reasons)


def test_state_resumes_after_restart_and_every_decision_is_logged(tmp_path: Path) -> None:
    d = ("I2",)
    pattern = [d, d, (), d, d, d, d, (), d, d, d]
    observations = [obs(i, p, new_labelled_rows=100 * i) for i, p in enumerate(pattern)]
    uninterrupted = run(RetrainPolicy(CONFIG), observations)

    log = tmp_path / "decisions.jsonl"
    first = RetrainPolicy(CONFIG, log_path=log)
    triggered = run(first, observations[:4])
    resumed = RetrainPolicy.from_dict(json.loads(json.dumps(first.to_dict())), log_path=log)
    triggered += [i + 4 for i in run(resumed, observations[4:])]
    assert triggered == uninterrupted == [5]  # window 10 (drift again + 1000 rows) falls inside the cooldown
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == len(observations)
    assert records[5]["verdict"] == "retrain" and records[5]["reasons"][0].startswith("drift: 3/3")
    assert (
        records[5]["inputs"]["observation"]["drifted_features"] == ["I2"]
        and records[5]["inputs"]["state"]["triggers"] == 1
    )
    with pytest.raises(RecopsError, match="policy state"):
        RetrainPolicy.from_dict({"config": {}, "state": {"bogus": 1}})
    with pytest.raises(RecopsError, match="must be >= 1"):
        replace(CONFIG, drift_windows=0)


def test_one_synthetic_drift_incident_triggers_one_retraining(tmp_path: Path) -> None:
    """Real drift reports: 4 clean windows then 8 windows with covariate drift (2000 rows each)."""
    save_reference(tmp_path, to_table(generate(SynthConfig(rows=20_000, seed=0))).to_pandas(), ColumnSpec.criteo())
    reference = load_reference(tmp_path)
    clean = to_table(generate(SynthConfig(rows=8_000, seed=1))).to_pandas()
    drifted = to_table(generate(SynthConfig(rows=16_000, seed=2, covariate_drift=0.3))).to_pandas()
    frames = [clean.iloc[i * 2000 : (i + 1) * 2000] for i in range(4)] + [
        drifted.iloc[i * 2000 : (i + 1) * 2000] for i in range(8)
    ]
    policy = RetrainPolicy(CONFIG)
    reports = [tuple(detect_drift(reference, f).drifted_features) for f in frames]
    assert run(policy, [obs(i, r) for i, r in enumerate(reports)]) == [6]
