"""The closed MLOps loop: a persisted state machine over a stream of labelled windows and a running Triton server.

::

    observe ──retrain──> retrain ──> validate ──pass──> publish ──> canary ──> watch_canary ──> decide_canary
       ^                                 │fail               (any failure: error, production keeps serving)   │
       └─────────────────────────────────┴──────────────────────────────────────────────────────────────────────┘

Each step is one stage module with a typed input and output: ``recops.ops.observe`` (a window → its record and
concept-drift verdict), ``recops.ops.policy`` (observation → ``Decision`` retrain | wait), ``recops.ops.retrain``
(incident windows → a registered ``Trained`` candidate), ``recops.ops.gate`` (export → ``Decision`` pass | fail),
``recops.ops.publish`` (candidate → repository version with its lineage), ``recops.ops.canary`` (arms → ``Decision``
promote | rollback, and the deployment moves). This module holds the transitions only; each step is committed through
``recops.ops.loop_state.Journal``: a restarted loop resumes where the state says, with no second retraining and no
window lost or counted twice. Window ``i`` covers ``[start_ts + i * window_s, start_ts + (i + 1) * window_s)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.ops.canary import Rollout, compare_arms
from recops.ops.drift import ConceptVerdict
from recops.ops.exposition import Exporter
from recops.ops.gate import validate
from recops.ops.loop_config import LoopConfig
from recops.ops.loop_state import Candidate, Journal, LoopState, ModelRef, Step, event, read_events
from recops.ops.observe import Observer, drift_events, labelled_rows, policy_observation
from recops.ops.policy import PolicyState, RetrainPolicy
from recops.ops.publish import lineage_of, production_model
from recops.ops.registry import LocalRegistry
from recops.ops.retrain import Retrainer, incident_windows
from recops.ops.stream import read_window, window_path
from recops.serving.deploy import DeployConfig, Deployer, recover_deployment
from recops.serving.export import ExportedModel, export_onnx, publish
from recops.serving.repository import ModelRepository
from recops.serving.server import TritonServer
from recops.training.dataset import Dataset

WINDOW_STEPS = (Step.OBSERVE, Step.WATCH_CANARY)
POLL_S = 1.0  # how often a following loop looks for the next window
Listener = Callable[[dict[str, Any]], None]


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
        self.journal.save_config(config.to_dict())
        self.repo = ModelRepository(config.repo)
        self.registry = LocalRegistry(config.registry)
        recover_deployment(self.repo, config.model_name, config.server_url, wait=False)  # one a crash cut short
        state = self.journal.load()
        start = math.floor(time.time() / config.window_s) * config.window_s
        self.state = state or LoopState(
            production_model(self.repo, self.registry, config.model_name, config.datasets, start), start
        )
        self.policy = RetrainPolicy(config.policy, PolicyState(**self.state.policy), self.journal.decisions)
        self.exporter = exporter
        self._export: tuple[int, ExportedModel] | None = None  # the candidate's export, made once per process
        self.observer = Observer(config.observe_config(), exporter)
        self.retrainer = Retrainer(config.retrain, self.registry, config.datasets)
        self.steps: dict[Step, Callable[[], list[dict[str, Any]]]] = {
            Step.RETRAIN: self._retrain,
            Step.VALIDATE: self._validate,
            Step.PUBLISH: self._publish,
            Step.CANARY: self._canary,
            Step.DECIDE_CANARY: self._decide_canary,
        }
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

    def events(self) -> list[dict[str, Any]]:  # the committed events
        return read_events(self.state_dir)

    # ---- running -----------------------------------------------------------------------------
    def step(self) -> list[dict[str, Any]]:
        """Run the current step once; returns the events it committed ([] when waiting for a window)."""
        if self.state.step in WINDOW_STEPS:
            return self._window()
        step = self.state.step
        try:
            return self.steps[step]()
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate step leaves production serving
            return self._abandon(step, exc)

    def run(
        self,
        max_windows: int | None = None,
        follow: bool = False,
        stop_after: str | None = None,
        on_event: Listener | None = None,
    ) -> LoopState:
        """Step until the stream has no next window (or ``max_windows`` were processed, or an event of kind
        ``stop_after`` was committed); ``follow`` waits for new windows instead. ``on_event`` sees every event."""
        processed = 0
        while True:
            if self.state.step in WINDOW_STEPS:
                if max_windows is not None and processed >= max_windows:
                    break
                if not window_path(self.config.stream_dir, self.state.next_window).is_file():
                    if not follow:
                        break
                    time.sleep(POLL_S)
                    continue
                processed += 1
            events = self.step()
            for committed in events if on_event else ():
                on_event(committed)
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
        return self._commit(event("error", reason, step=step.value, production=self.state.production.repo_version))

    def _back_to_observe(self) -> None:
        self.state.step, self.state.candidate, self.state.canary, self.state.canary_arms = Step.OBSERVE, None, None, []

    def _window(self) -> list[dict[str, Any]]:
        index, state = self.state.next_window, self.state
        frame = read_window(self.config.stream_dir, index, Dataset.open(state.production.dataset).spec)
        if frame is None:
            return []
        ts = state.window_ts(index, self.config.window_s)
        try:
            record, concept = self.observer.observe(index, frame, ts, state.production, state.canary)
        except RecopsError as exc:
            self._commit(event("error", f"window {index} not processed: {exc}", window=index))
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
        rows = labelled_rows(self.state_dir, self.state.data_files, production.since_window)
        decision = self.policy.decide(policy_observation(record, concept, production, rows))
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
        self.state.step, self.state.candidate = (
            Step.RETRAIN,
            Candidate(self.state.retrains, windows, fired, str(run_dir)),
        )
        reason = (
            f"policy fired ({', '.join(fired)}): {'; '.join(decision.reasons[: len(fired)])}; "
            f"training on windows {windows[0]}..{windows[-1]}"
        )
        return [event("retrain_started", reason, window=index, windows=windows, trigger=fired)]

    def _retrain(self) -> list[dict[str, Any]]:
        candidate = self.state.candidate
        files = [self.state_dir / self.state.data_files[str(w)] for w in candidate.windows]
        why = f"loop retraining {candidate.id}"
        candidate.trained = self.retrainer.retrain(files, self.state.production, Path(candidate.run_dir), why)
        self.state.step = Step.VALIDATE
        return self._commit(candidate.trained.event())

    def _exported(self) -> ExportedModel:
        """The candidate's ONNX export, with its registry lineage (made once per process; again after a restart)."""
        candidate = self.state.candidate
        if self._export is None or self._export[0] != candidate.id:
            version = self.registry.get(candidate.trained.registry_version)
            out, lineage = Path(candidate.run_dir) / "export", lineage_of(self.registry, version)
            self._export = (candidate.id, export_onnx(version.checkpoint, out, lineage=lineage))
        return self._export[1]

    def _validate(self) -> list[dict[str, Any]]:
        candidate, production = self.state.candidate, self.state.production
        served = self.repo.model_dir(self.config.model_name) / str(production.repo_version)
        verdict = validate(self._exported(), candidate.trained.dataset, served, self.config.gate)
        candidate.validation = verdict.to_dict()
        fields = {"registry_version": candidate.trained.registry_version, "validation": candidate.validation}
        if verdict.verdict != "pass":
            self.registry.set_alias(candidate.trained.registry_version, "rejected", reason=verdict.reason)
            self._back_to_observe()
            reason = f"{verdict.reason}; production v{production.repo_version} keeps serving"
            return self._commit(event("validation_failed", reason, **fields, production=production.repo_version))
        self.state.step = Step.PUBLISH
        return self._commit(event("validation_passed", verdict.reason, **fields))

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
        reason = f"registry v{registered} passed the parity gate and is {name} version {version} in {self.repo.root}"
        return self._commit(event("exported", reason, version=version, registry_version=registered))

    def _rollout(self) -> Rollout:
        server = TritonServer.attach(self.config.server_url)
        config = DeployConfig(drain_s=self.config.canary.drain_s)
        return Rollout(Deployer(server, self.repo, self.config.model_name, config), self.registry, self.repo)

    def _canary(self) -> list[dict[str, Any]]:
        candidate, share, production = self.state.candidate, self.config.canary.share, self.state.production
        version, trained = candidate.repo_version, candidate.trained
        try:
            self._rollout().start(version, share)
        except RecopsError as exc:
            self._back_to_observe()
            reason = f"canary refused: {exc}"
            return self._commit(event("rolled_back", reason, version=version, production=production.repo_version))
        index = self.state.next_window
        ts = self.state.window_ts(index, self.config.window_s)
        self.state.canary = ModelRef(version, trained.registry_version, trained.dataset, trained.checkpoint, index, ts)
        self.state.canary_arms, self.state.step = [], Step.WATCH_CANARY
        reason = (
            f"version {version} serves {share:.0%} of keys beside production v{production.repo_version} for "
            f"{self.config.canary.windows} window(s)"
        )
        return self._commit(event("canary_started", reason, version=version, share=share))

    def _decide_canary(self) -> list[dict[str, Any]]:
        canary, production, arms = self.state.canary, self.state.production, self.state.canary_arms
        verdict = compare_arms(arms, str(production.repo_version), str(canary.repo_version), self.config.canary)
        rollout = self._rollout()
        if verdict.verdict == "promote":
            rollout.promote(canary.registry_version, verdict.reason)
            index, figures = self.state.next_window, verdict.details["canary"]
            canary.since_window, canary.since_ts = index, self.state.window_ts(index, self.config.window_s)
            source = f"online, canary windows {index - len(arms)}..{index - 1}"
            canary.set_baseline(figures["auc"], figures["logloss"], source)
            self.state.production, kind = canary, "promoted"
        else:
            rollout.rollback(canary.registry_version, verdict.reason)
            kind = "rolled_back"
        self._back_to_observe()
        reason = verdict.reason + ("; promoted" if kind == "promoted" else "; rolled back")
        fields = {"version": canary.repo_version, "previous": production.repo_version}
        return self._commit(
            event(kind, reason, **fields, production=self.state.production.repo_version, comparison=verdict.to_dict())
        )
