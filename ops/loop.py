"""The closed MLOps loop: a persisted state machine over a stream of labelled windows and a running Triton server.

::

    observe ──retrain──> retrain ──> validate ──pass──> publish ──> canary ──> watch_canary ──> decide_canary
       ^                                 │fail               (any failure: error, production keeps serving)   │
       └─────────────────────────────────┴──────────────────────────────────────────────────────────────────────┘

Each step is one stage module with a typed input and output: ``recops.ops.observe`` (a window → its record and
concept-drift verdict), ``recops.ops.policy`` (observation → ``Decision`` retrain | wait), ``recops.ops.retrain``
(incident windows → a registered ``Trained`` candidate), ``recops.ops.gate`` (export → ``Decision`` pass | fail),
``recops.ops.publish`` (candidate → repository version with its lineage), ``recops.ops.canary`` (arms → ``Decision``
promote | rollback, and the deployment moves). This module holds the transitions only; every step is committed
through ``recops.ops.loop_state.Journal``, so a restarted loop resumes exactly where the state says: no second
retraining, no window lost or counted twice. Time inside the loop is the stream's: window ``i`` covers
``[start_ts + i * window_s, start_ts + (i + 1) * window_s)``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.ops.canary import Rollout, compare_arms
from recops.ops.drift import ConceptVerdict
from recops.ops.exposition import Exporter
from recops.ops.gate import validate
from recops.ops.loop_config import LoopConfig
from recops.ops.loop_state import (
    CONFIG_FILE,
    DECISIONS_FILE,
    Candidate,
    Journal,
    LoopState,
    ModelRef,
    Step,
    read_events,
)
from recops.ops.observe import Observer, drift_events, labelled_rows
from recops.ops.policy import Observation, PolicyState, RetrainPolicy
from recops.ops.publish import lineage_of, production_model
from recops.ops.registry import LocalRegistry
from recops.ops.retrain import Retrainer, incident_windows
from recops.ops.stream import read_window, window_path
from recops.serving.deploy import DeployConfig, Deployer
from recops.serving.export import ExportedModel, export_onnx, publish
from recops.serving.repository import ModelRepository
from recops.serving.server import TritonServer
from recops.training.dataset import Dataset

WINDOW_STEPS = (Step.OBSERVE, Step.WATCH_CANARY)


class Loop:
    """The closed loop over ``config.stream_dir`` against the server at ``config.server_url``; one per state dir.
    ``exporter`` (``recops.ops.exposition.Exporter``) is fed after every window, for a Prometheus ``/metrics``."""

    def __init__(self, config: LoopConfig, exporter: Exporter | None = None):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.journal = Journal(self.state_dir)
        self._lock = self.journal.acquire()
        try:
            self._open(exporter)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, exporter: Exporter | None) -> None:
        config = self.config
        write_json_atomic(self.state_dir / CONFIG_FILE, config.to_dict())
        self.repo = ModelRepository(config.repo)
        self.registry = LocalRegistry(config.registry)
        state = self.journal.load()
        start = math.floor(time.time() / config.window_s) * config.window_s
        self.state = state or LoopState(production_model(self.repo, self.registry, config.model_name, config.datasets,
                                                         start), start)
        self.policy = RetrainPolicy(config.policy, PolicyState(**self.state.policy), self.state_dir / DECISIONS_FILE)
        self.exporter = exporter
        self._export: tuple[int, ExportedModel] | None = None  # the candidate's export, made once per process
        self.observer = Observer(config.observe_config(), exporter)
        self.retrainer = Retrainer(config.retrain, self.registry, config.datasets)
        self.steps: dict[Step, Callable[[], list[dict[str, Any]]]] = {
            Step.RETRAIN: self._retrain, Step.VALIDATE: self._validate, Step.PUBLISH: self._publish,
            Step.CANARY: self._canary, Step.DECIDE_CANARY: self._decide_canary}
        if state is None:
            self._commit()

    def _commit(self, *events: dict[str, Any]) -> list[dict[str, Any]]:
        self.state.policy = dataclasses.asdict(self.policy.state)
        return self.journal.commit(self.state, *events)

    def close(self) -> None:
        """Release the state dir (another Loop may then resume it) and the server connections."""
        self.observer.close()
        self._lock.release()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.state_dir)

    # ---- running -----------------------------------------------------------------------------
    def window_available(self) -> bool:
        return window_path(self.config.stream_dir, self.state.next_window).is_file()

    def step(self) -> list[dict[str, Any]]:
        """Run the current step once; returns the events it committed ([] when waiting for a window)."""
        if self.state.step in WINDOW_STEPS:
            return self._window()
        step = self.state.step
        try:
            return self.steps[step]()
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate step leaves production serving
            return self._abandon(step, exc)

    def run(self, max_windows: int | None = None, follow: bool = False, poll_s: float = 1.0,
            stop_after: str | None = None, on_event: Callable[[dict[str, Any]], None] | None = None) -> LoopState:
        """Step until the stream has no next window (or ``max_windows`` were processed, or an event of kind
        ``stop_after`` was committed); ``follow`` waits for new windows instead. ``on_event`` sees every event."""
        processed = 0
        while True:
            if self.state.step in WINDOW_STEPS:
                if max_windows is not None and processed >= max_windows:
                    break
                if not self.window_available():
                    if not follow:
                        break
                    time.sleep(poll_s)
                    continue
                processed += 1
            events = self.step()
            for event in events if on_event else ():
                on_event(event)
            if stop_after and any(e["kind"] == stop_after for e in events):
                break
        return self.state

    def _abandon(self, step: Step, exc: Exception) -> list[dict[str, Any]]:
        """A candidate step failed: drop the candidate (and its canary), production keeps serving."""
        reason = f"{step.value} failed: {type(exc).__name__}: {exc}"
        if self.state.canary is not None:
            try:
                self._rollout().rollback(None, reason)
                reason += "; canary rolled back"
            except RecopsError as again:
                reason += f"; rolling the canary back ALSO failed: {again}"
        self._back_to_observe()
        return self._commit({"kind": "error", "reason": reason, "step": step.value,
                             "production": self.state.production.repo_version})

    def _back_to_observe(self) -> None:
        self.state.step, self.state.candidate, self.state.canary, self.state.canary_arms = Step.OBSERVE, None, None, []

    # ---- observe / watch_canary ----------------------------------------------------------------
    def _window(self) -> list[dict[str, Any]]:
        index, state = self.state.next_window, self.state
        frame = read_window(self.config.stream_dir, index, Dataset.open(state.production.dataset).spec)
        if frame is None:
            return []
        try:
            record, concept = self.observer.observe(index, frame, state.window_ts(index, self.config.window_s),
                                                    state.production, state.canary)
        except RecopsError as exc:
            self._commit({"kind": "error", "reason": f"window {index} not processed: {exc}", "window": index})
            raise
        state.data_files[str(index)] = f"data/{window_path(self.config.stream_dir, index).name}"
        state.next_window = index + 1
        decided = self._decide(index, record, concept) if state.step == Step.OBSERVE else self._watch(record)
        return self._commit({"kind": "window", **record}, *drift_events(record, concept), *decided)

    def _watch(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        self.state.canary_arms.append(record["arms"])
        if len(self.state.canary_arms) >= self.config.canary.windows:
            self.state.step = Step.DECIDE_CANARY
        return []

    def _decide(self, index: int, record: dict[str, Any], concept: ConceptVerdict | None) -> list[dict[str, Any]]:
        production = self.state.production
        arm = record["arms"].get(str(production.repo_version), {})
        if production.baseline_auc is None:
            production.set_baseline(arm.get("auc"), arm.get("logloss"), f"online, window {index}")
        decision = self.policy.decide(Observation(
            ts=record["ts"], model_version=str(production.repo_version), model_trained_at=production.since_ts,
            window=record["ts"], drifted_features=tuple(record["drifted"]),
            concept_drifted=concept.drifted if concept else None,
            concept_reasons=tuple(concept.reasons) if concept else (),
            new_labelled_rows=labelled_rows(self.state_dir, self.state.data_files, production.since_window)))
        record["decision"] = decision.to_dict()
        if self.exporter is not None:
            self.exporter.observe_policy(self.policy, decision)
        if decision.verdict != "retrain":
            return []
        fired = decision.details["fired"]
        streaks = {"drift": self.policy.state.drift_streak, "quality": self.policy.state.quality_streak}
        windows = incident_windows(index, fired, streaks, production.since_window, self.config.retrain)
        self.state.retrains += 1
        run_dir = self.state_dir / "retrains" / f"{self.state.retrains:03d}"
        self.state.step, self.state.candidate = Step.RETRAIN, Candidate(self.state.retrains, windows, fired, str(run_dir))
        return [{"kind": "retrain_started", "window": index, "windows": windows, "trigger": fired,
                 "reason": f"policy fired ({', '.join(fired)}): {'; '.join(decision.reasons[:len(fired)])}; "
                           f"training on windows {windows[0]}..{windows[-1]}"}]

    # ---- candidate steps -----------------------------------------------------------------------
    def _retrain(self) -> list[dict[str, Any]]:
        candidate = self.state.candidate
        files = [self.state_dir / self.state.data_files[str(w)] for w in candidate.windows]
        trained = self.retrainer.retrain(files, self.state.production, Path(candidate.run_dir),
                                         f"loop retraining {candidate.id}")
        candidate.trained, self.state.step = trained, Step.VALIDATE
        return self._commit(trained.event())

    def _exported(self) -> ExportedModel:
        """The candidate's ONNX export, with its registry lineage (made once per process; again after a restart)."""
        candidate = self.state.candidate
        if self._export is None or self._export[0] != candidate.id:
            version = self.registry.get(candidate.trained.registry_version)
            self._export = (candidate.id, export_onnx(version.checkpoint, Path(candidate.run_dir) / "export",
                                                      lineage=lineage_of(self.registry, version)))
        return self._export[1]

    def _validate(self) -> list[dict[str, Any]]:
        candidate, production = self.state.candidate, self.state.production
        verdict = validate(self._exported(), candidate.trained.dataset,
                           self.repo.model_dir(self.config.model_name) / str(production.repo_version), self.config.gate)
        candidate.validation = verdict.to_dict()
        event = {"registry_version": candidate.trained.registry_version, "validation": candidate.validation}
        if verdict.verdict != "pass":
            self.registry.set_alias(candidate.trained.registry_version, "rejected", reason=verdict.reason)
            self._back_to_observe()
            return self._commit({"kind": "validation_failed", **event, "production": production.repo_version,
                                 "reason": f"{verdict.reason}; production v{production.repo_version} keeps serving"})
        self.state.step = Step.PUBLISH
        return self._commit({"kind": "validation_passed", **event, "reason": verdict.reason})

    def _publish(self) -> list[dict[str, Any]]:
        candidate, name = self.state.candidate, self.config.model_name
        if candidate.repo_version is None:
            candidate.repo_version = self.repo.next_version(name)
            self._commit()  # the planned version, so a rerun after a crash recognises its own export
        version, registered = candidate.repo_version, candidate.trained.registry_version
        if version not in self.repo.versions(name):
            publish(self._exported(), self.repo, name, dataset=candidate.trained.dataset, version=version)
            self.registry.record_served(registered, str(self.repo.root.resolve()), name, version, "exported")
        self.state.step = Step.CANARY
        return self._commit({"kind": "exported", "version": version, "registry_version": registered,
                             "reason": f"registry v{registered} passed the parity gate and is {name} version "
                                       f"{version} in {self.repo.root}"})

    def _rollout(self) -> Rollout:
        deployer = Deployer(TritonServer.attach(self.config.server_url), self.repo, self.config.model_name,
                            DeployConfig(drain_s=self.config.canary.drain_s))
        return Rollout(deployer, self.registry, self.repo)

    def _canary(self) -> list[dict[str, Any]]:
        candidate, share, production = self.state.candidate, self.config.canary.share, self.state.production
        version, trained = candidate.repo_version, candidate.trained
        try:
            self._rollout().start(version, share)
        except RecopsError as exc:
            self._back_to_observe()
            return self._commit({"kind": "rolled_back", "version": version, "reason": f"canary refused: {exc}",
                                 "production": production.repo_version})
        index = self.state.next_window
        self.state.canary = ModelRef(version, trained.registry_version, trained.dataset, trained.checkpoint, index,
                                     self.state.window_ts(index, self.config.window_s))
        self.state.canary_arms, self.state.step = [], Step.WATCH_CANARY
        return self._commit({"kind": "canary_started", "version": version, "share": share,
                             "reason": f"version {version} serves {share:.0%} of keys beside production "
                                       f"v{production.repo_version} for {self.config.canary.windows} window(s)"})

    def _decide_canary(self) -> list[dict[str, Any]]:
        canary, production, arms = self.state.canary, self.state.production, self.state.canary_arms
        verdict = compare_arms(arms, str(production.repo_version), str(canary.repo_version), self.config.canary)
        rollout = self._rollout()
        if verdict.verdict == "promote":
            rollout.promote(canary.registry_version, verdict.reason)
            index = self.state.next_window
            canary.since_window, canary.since_ts = index, self.state.window_ts(index, self.config.window_s)
            canary.set_baseline(verdict.details["canary"]["auc"], verdict.details["canary"]["logloss"],
                                f"online, canary windows {index - len(arms)}..{index - 1}")
            self.state.production, kind = canary, "promoted"
        else:
            rollout.rollback(canary.registry_version, verdict.reason)
            kind = "rolled_back"
        self._back_to_observe()
        reason = verdict.reason + ("; promoted" if kind == "promoted" else "; rolled back")
        return self._commit({"kind": kind, "version": canary.repo_version, "previous": production.repo_version,
                             "production": self.state.production.repo_version, "comparison": verdict.to_dict(),
                             "reason": reason})
