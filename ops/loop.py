"""The closed MLOps loop: watch live windows, retrain on drift, gate, canary, promote or roll back.

``Loop`` is a persisted state machine over a stream directory (``recops.ops.stream``) and a running Triton
server. Steps::

    observe ──trigger──> retrain ──> validate ──pass──> export ──> canary ──> watch_canary ──> decide_canary
       ^                                │fail              (any failure: error / rolled_back)      │
       └────────────────────────────────┴──────────────────────────────────────────────────────────┘

* ``observe`` / ``watch_canary`` process one window: each row is routed by its request id to the
  production or canary version (``recops.serving.deploy.Router``) and scored through Triton; predictions
  (with the raw features) and feedback (the window's labels) are logged per window under
  ``logs/`` (``recops.ops.online``), the labelled rows are kept as ``data/window-*.tsv``; online metrics per
  arm, drift against the production model's dataset reference (``recops.ops.drift``) and Triton's latency
  and failures feed the ``RetrainPolicy`` (observe only: during a canary the incident is being handled).
* ``retrain`` ingests the incident's windows (``recops.training.dataset.ingest``, the production dataset's
  preprocessing) and trains: a small Ray Tune sweep (``recops.training.sweep``, registered by
  ``recops.ops.experiments.register_best``) when ``RetrainConfig.use_sweep``, else ``recops.training.train.fit``;
  both warm-start from the production checkpoint when the tables match (else from scratch, recorded).
* ``validate`` exports ONNX and runs the gates: export parity, no NaN, holdout AUC on the NEW data not
  worse than production's by more than ``GateConfig.auc_margin``, per-slice AUC not collapsing.
* ``export`` adds the version to the Triton repository; ``canary`` loads it for a deterministic share
  of keys; after ``CanaryConfig.windows`` windows the arms' online metrics decide promote or rollback.

Every step is committed: its events (``{seq, t, kind, reason, ...}``) are appended to
``events.jsonl``, then ``state.json`` is replaced atomically. Events with ``seq`` beyond the state's
``next_seq`` (a crash between the two writes) are dropped on load, and steps with side effects check
the deployment record / repository first, so a restarted loop resumes exactly where the state says:
no second retraining, no window lost or counted twice. Time inside the loop is the stream's: window
``i`` covers ``[start_ts + i * window_s, start_ts + (i + 1) * window_s)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from recops.ops.drift import DriftConfig
from recops.ops.policy import Observation, PolicyConfig, PolicyState, RetrainPolicy
from recops.ops.stream import read_truth, read_window, window_path
from recops.errors import RecopsError
from recops.training.metrics import auc

if TYPE_CHECKING:
    from recops.ops.exposition import Exporter
    from recops.training.train import TrainConfig

STATE_FILE = "state.json"
CONFIG_FILE = "loop_config.json"  # the configuration of the latest start (read by `recops monitor`)
EVENTS_FILE = "events.jsonl"
DECISIONS_FILE = "decisions.jsonl"
EVENT_KINDS = ("window", "drift_detected", "retrain_started", "retrain_finished", "validation_passed",
               "validation_failed", "exported", "canary_started", "promoted", "rolled_back", "error")
STEPS = ("observe", "retrain", "validate", "export", "canary", "watch_canary", "decide_canary")
WINDOW_STEPS = ("observe", "watch_canary")


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GateConfig:
    """What a retrained model must show on the holdout (test split) of its NEW dataset."""

    auc_margin: float = 0.01  # candidate AUC >= production AUC - margin
    slice_features: tuple[str, ...] = ("C1", "C2")
    slice_top: int = 3  # the most frequent values of each slice feature
    slice_min_rows: int = 200
    slice_margin: float = 0.05  # candidate slice AUC >= production slice AUC - margin
    holdout_rows: int = 100_000


@dataclass(frozen=True)
class CanaryConfig:
    """Canary share of keys, how long it runs, and how much worse than production it may look."""

    share: float = 0.5
    windows: int = 1
    auc_margin: float = 0.01
    logloss_margin: float = 0.05  # relative
    drain_s: float = 1.0


def _train_config(**kwargs: Any) -> TrainConfig:
    from recops.training.train import TrainConfig  # torch: imported only when a loop is configured

    return TrainConfig(**kwargs)


@dataclass(frozen=True)
class RetrainConfig:
    """How a triggered retraining trains.

    The incident's windows are the training data: the windows of the streak that fired (drift/quality),
    else those since the production model took over, clamped to ``[min_windows, max_windows]``.
    ``sweep_config`` (YAML, ``recops.training.sweep_config``) is the sweep template: its dataset, storage path,
    warm start and architecture are set per retraining. Without it a built-in small sweep is used.
    """

    use_sweep: bool = False
    sweep_config: Path | None = None
    train: TrainConfig = field(default_factory=lambda: _train_config(epochs=2, batch_size=512))
    warm_start: bool = True
    min_windows: int = 2
    max_windows: int = 8


@dataclass(frozen=True)
class LoopConfig:
    """Where the loop reads, serves and writes, and its policies."""

    state_dir: Path
    stream_dir: Path
    repo: Path
    model_name: str
    server_url: str
    datasets_root: Path | None = None  # the production model's dataset lives here; default <state_dir>/datasets
    registry: Path | None = None  # default $RECOPS_REGISTRY or runs/registry
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
            raise RecopsError(f"loop config: need window_s > 0 and 0 <= feedback_delay_s < window_s, got "
                              f"{self.window_s}, {self.feedback_delay_s}")
        if not 0 < self.canary.share < 1 or self.canary.windows < 1:
            raise RecopsError(f"loop config: canary share must be in (0, 1) and windows >= 1, got "
                              f"{self.canary.share}, {self.canary.windows}")
        if not 1 <= self.retrain.min_windows <= self.retrain.max_windows:
            raise RecopsError("loop config: retrain needs 1 <= min_windows <= max_windows")

    @property
    def datasets(self) -> Path:
        return Path(self.datasets_root) if self.datasets_root else Path(self.state_dir) / "datasets"


# --------------------------------------------------------------------------------------------- state


@dataclass
class ModelRef:
    """A served model: its repository version, registry version, training dataset and quality baseline.

    The baseline that quality drift is measured against is online: the model's AUC/logloss in its first
    window as production, or, for a promoted canary, over its canary windows. (Offline validation
    figures are optimistic: the best epoch is picked on them, and they come from another sample.)
    """

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
class LoopState:
    """Everything a restarted loop needs (``state.json``)."""

    production: ModelRef
    start_ts: float
    step: str = "observe"
    next_window: int = 0
    next_seq: int = 0
    canary: ModelRef | None = None
    candidate: dict[str, Any] | None = None
    canary_arms: list[dict[str, Any]] = field(default_factory=list)  # per canary window: arm -> metrics
    policy: dict[str, Any] = field(default_factory=lambda: asdict(PolicyState()))
    data_files: dict[str, str] = field(default_factory=dict)  # window index -> labelled rows (relative path)
    retrains: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        canary = data.get("canary")
        return cls(**{**data, "production": ModelRef(**data["production"]),
                      "canary": ModelRef(**canary) if canary else None})


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON to ``path`` via a temp file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    """The committed events of a loop's state dir (complete lines only)."""
    path = Path(state_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line.strip()]


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
    return str(value) if isinstance(value, Path) else value


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    """Impression-weighted mean of ``key`` over window metrics that have it."""
    pairs = [(r[key], r["impressions"]) for r in rows if r.get(key) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


# ---------------------------------------------------------------------------------------------- loop


class Loop:
    """The closed loop over ``config.stream_dir`` against the server at ``config.server_url``."""

    def __init__(self, config: LoopConfig, exporter: Exporter | None = None):
        """``exporter`` (``recops.ops.exposition.Exporter``) is fed after every window: online quality, drift,
        policy state and the production version, for a Prometheus ``/metrics`` endpoint."""
        from filelock import FileLock, Timeout

        self.config, self.exporter = config, exporter
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.state_dir / ".loop.lock"), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise RecopsError(f"another loop runs on {self.state_dir}; stop it first (one loop per state dir)") from None
        try:
            self._open(config)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, config: LoopConfig) -> None:
        from recops.ops.registry import LocalRegistry
        from recops.serving.repository import ModelRepository

        write_json_atomic(self.state_dir / CONFIG_FILE, loop_config_dict(config))
        self.repo = ModelRepository(config.repo)
        self.registry = LocalRegistry(config.registry)
        self._cache: dict[str, Any] = {}
        self._last_scrape: tuple[float, dict] | None = None
        path = self.state_dir / STATE_FILE
        fresh = not path.is_file()
        if fresh:
            start = math.floor(time.time() / config.window_s) * config.window_s
            self.state = LoopState(production=self._production_ref(start), start_ts=start)
        else:
            try:
                self.state = LoopState.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError) as exc:
                raise RecopsError(f"loop state {path} is unreadable ({exc}); move the state dir away to start afresh") from exc
            self._drop_uncommitted_events()
        self.policy = RetrainPolicy(config.policy, PolicyState(**self.state.policy), self.state_dir / DECISIONS_FILE)
        if fresh:
            self._commit()

    # ---- persistence -------------------------------------------------------------------------
    def _commit(self, *events: dict[str, Any]) -> list[dict[str, Any]]:
        """Append ``events`` (numbered) to the event log, then atomically save the state."""
        stamped = []
        for event in events:
            stamped.append({"seq": self.state.next_seq, "t": time.time(), **event})
            self.state.next_seq += 1
        if stamped:
            with open(self.state_dir / EVENTS_FILE, "a") as fh:
                fh.write("".join(json.dumps(jsonable(e)) + "\n" for e in stamped))
                fh.flush()
                os.fsync(fh.fileno())
        self.state.policy = asdict(self.policy.state)
        write_json_atomic(self.state_dir / STATE_FILE, jsonable(self.state.to_dict()))
        return stamped

    def close(self) -> None:
        """Release the state dir (another Loop may then resume it) and the server connections."""
        for key, value in list(self._cache.items()):
            if key == "router" or key.startswith("predictor-"):
                value.close()
        self._cache.clear()
        self._lock.release()

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop_uncommitted_events(self) -> None:
        """Events written after the last state save belong to a step that will run again: drop them."""
        path = self.state_dir / EVENTS_FILE
        if not path.is_file():
            return
        raw = path.read_bytes()
        kept = [e for e in read_events(self.state_dir) if e["seq"] < self.state.next_seq]
        if raw.count(b"\n") != len(kept) or not raw.endswith(b"\n") and raw:
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{EVENTS_FILE}.")
            with os.fdopen(fd, "w") as fh:
                fh.write("".join(json.dumps(e) + "\n" for e in kept))
            os.replace(tmp, path)

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.state_dir)

    # ---- bootstrapping -----------------------------------------------------------------------
    def _production_ref(self, start_ts: float) -> ModelRef:
        """The model the deployment record calls production, traced to its checkpoint and dataset."""
        from recops.serving.deploy import read_deploy_state
        from recops.serving.onnx_model import read_export_metadata

        name = self.config.model_name
        production = read_deploy_state(self.repo, name).production
        if production is None:
            raise RecopsError(f"model {name!r} has no production version in {self.repo.root}; deploy one first "
                              f"(`recops deploy --name {name} --version V --repo {self.repo.root}`)")
        meta = read_export_metadata(self.repo.model_dir(name) / str(production))
        if meta is None:
            raise RecopsError(f"{name} version {production} has no export.json; export it with `recops export`")
        checkpoint = Path(meta["checkpoint"]).resolve()
        trainer = json.loads((checkpoint / "trainer.json").read_text())
        dataset = self.config.datasets / trainer["dataset_version"]
        if not (dataset / "manifest.json").is_file():
            raise RecopsError(f"production dataset {trainer['dataset_version']} is not under {self.config.datasets}; "
                              "pass the dataset root the model was trained from (--datasets)")
        registered = [v.version for v in self.registry.list() if v.checkpoint == checkpoint] \
            if (Path(self.registry.root) / "index.json").is_file() else []
        return ModelRef(production, registered[0] if registered else None, str(dataset.resolve()), str(checkpoint),
                        0, start_ts)

    # ---- running -----------------------------------------------------------------------------
    def window_ts(self, index: int) -> float:
        return self.state.start_ts + index * self.config.window_s

    def window_available(self) -> bool:
        return window_path(self.config.stream_dir, self.state.next_window).is_file()

    def step(self) -> list[dict[str, Any]]:
        """Run the current step once; returns the events it committed ([] when waiting for a window)."""
        if self.state.step not in STEPS:
            raise RecopsError(f"loop state: unknown step {self.state.step!r}; expected one of {STEPS}")
        if self.state.step in WINDOW_STEPS:
            return self._window_step()
        handler = getattr(self, f"_{self.state.step}")
        try:
            return handler()
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate step leaves production serving
            return self._abandon(self.state.step, exc)

    def run(self, max_windows: int | None = None, follow: bool = False, poll_s: float = 1.0,
            stop_after: str | None = None, on_event: Callable[[dict[str, Any]], None] | None = None) -> LoopState:
        """Step until the stream has no next window (or ``max_windows`` were processed, or an event of kind
        ``stop_after`` was committed); ``follow`` waits for new windows instead of returning. ``on_event``
        sees every committed event."""
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

    def _abandon(self, step: str, exc: Exception) -> list[dict[str, Any]]:
        """A candidate step failed: drop the candidate (and its canary), production keeps serving."""
        reason = f"{step} failed: {type(exc).__name__}: {exc}"
        if self.state.canary is not None:
            reason += self._rollback_quietly()
        self.state.step, self.state.candidate, self.state.canary, self.state.canary_arms = "observe", None, None, []
        return self._commit({"kind": "error", "reason": reason, "step": step,
                             "production": self.state.production.repo_version})

    def _rollback_quietly(self) -> str:
        try:
            self._deployer().rollback()
            return "; canary rolled back"
        except RecopsError as exc:
            return f"; rolling the canary back ALSO failed: {exc}"

    # ---- windows -----------------------------------------------------------------------------
    @property
    def spec(self):
        """The raw-data schema (the production dataset's)."""
        from recops.training.spec import ColumnSpec

        if "spec" not in self._cache:
            manifest = json.loads((Path(self.state.production.dataset) / "manifest.json").read_text())
            self._cache["spec"] = ColumnSpec.from_dict(manifest["schema"])
        return self._cache["spec"]

    def _window_step(self) -> list[dict[str, Any]]:
        index = self.state.next_window
        frame = read_window(self.config.stream_dir, index, self.spec)
        if frame is None:
            return []
        try:
            record = self._process_window(index, frame)
        except RecopsError as exc:
            self._commit({"kind": "error", "reason": f"window {index} not processed: {exc}", "window": index})
            raise
        self.state.next_window = index + 1
        if self.state.step == "observe":
            decided = self._decide(index, record)
        else:
            decided = []
            self.state.canary_arms.append(record["arms"])
            if len(self.state.canary_arms) >= self.config.canary.windows:
                self.state.step = "decide_canary"
        concept = record["concept"]["reasons"] if record["concept"] else []
        drift = ([f"data drift in {', '.join(record['drifted'])}"] if record["drifted"] else []) + \
            [f"concept drift: {r}" for r in concept]
        detected = [{"kind": "drift_detected", "window": index, "features": record["drifted"],
                     "reason": f"window {index}: {'; '.join(drift)}"}] if drift else []
        return self._commit({"kind": "window", **record}, *detected, *decided)

    def _process_window(self, index: int, frame) -> dict[str, Any]:
        from recops.ops.drift import detect_drift
        from recops.ops.online import OnlineConfig, log_feedback, log_predictions, read_online

        spec, ts = self.spec, self.window_ts(index)
        ids = np.array([f"w{index:05d}-{row:06d}" for row in range(len(frame))])
        features = frame.drop(columns=[spec.label])
        labels = frame[spec.label].to_numpy()
        probs, versions = self._score(features, ids)
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        predictions, feedback = logs / f"predictions-{index:05d}.jsonl", logs / f"feedback-{index:05d}.jsonl"
        for path in (predictions, feedback):  # a window processed again is logged afresh, never twice
            path.unlink(missing_ok=True)
        for version in np.unique(versions):
            rows = versions == version
            log_predictions(predictions, ids[rows], probs[rows], str(version), ts=ts + 1.0, features=features[rows])
        log_feedback(feedback, ids, labels, ts=ts + self.config.feedback_delay_s)
        online = read_online(predictions, feedback, OnlineConfig(self.config.window_s, self.config.window_s),
                             now=ts + 2 * self.config.window_s)
        self._keep_labelled_rows(index)
        drift = detect_drift(self._reference(), features, self.config.drift)
        truth = read_truth(self.config.stream_dir, index)
        keep = ("impressions", "clicks", "ctr", "mean_prediction", "calibration", "auc", "logloss")
        arms = {w.model_version: {k: getattr(w, k) for k in keep} for w in online.windows}
        production = arms.get(str(self.state.production.repo_version), {})
        concept = self._concept_drift(production)
        drift_dict = drift.to_dict()
        if self.exporter is not None:
            self.exporter.observe_online(online)
            self.exporter.observe_drift(drift)
            self.exporter.set_model(str(self.state.production.repo_version), self.state.production.since_ts)
        return {
            "window": index, "ts": ts, "rows": len(frame), "production": self.state.production.repo_version,
            "canary": self.state.canary.repo_version if self.state.canary else None,
            "arms": arms, "drifted": drift.drifted_features,
            "drift": {f: {k: v[k] for k in ("test", "value", "threshold", "drifted")} for f, v in drift_dict["features"].items()},
            "concept": concept.to_dict() if concept else None,
            "oracle_auc": _finite(auc(labels, truth)) if truth is not None and len(truth) == len(labels) else None,
            "triton": self._triton_figures(),
            "reason": f"window {index}: {len(frame)} rows, production v{self.state.production.repo_version} "
                      f"AUC {_fmt(production.get('auc'))} logloss {_fmt(production.get('logloss'))}"
                      + (f", canary v{self.state.canary.repo_version} AUC "
                         f"{_fmt(arms.get(str(self.state.canary.repo_version), {}).get('auc'))}" if self.state.canary else "")
                      + (f"; drift in {', '.join(drift.drifted_features)}" if drift.drifted_features else "; no drift"),
        }

    def _concept_drift(self, arm: dict[str, Any]):
        """The production arm's quality vs its baseline (``recops.ops.drift.concept_drift``, the policy's margins)."""
        from recops.ops.drift import concept_drift

        production, policy = self.state.production, self.config.policy
        if production.baseline_auc is None or arm.get("auc") is None or arm.get("logloss") is None:
            return None
        config = dataclasses.replace(self.config.drift, auc_drop_min=policy.auc_drop_margin,
                                     logloss_rise_min=policy.logloss_rise_margin)
        return concept_drift(arm["auc"], arm["logloss"], production.baseline_auc, production.baseline_logloss, config,
                             arm["clicks"], arm["impressions"] - arm["clicks"])

    def _score(self, features, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Route each row by its id (the deployment record's canary share) and score it through Triton."""
        router = self._router()
        routes = [router.route(str(key)) for key in ids]
        versions = np.array([v for v, _ in routes])
        probs = np.empty(len(ids), dtype=np.float64)
        for version in np.unique(versions):
            rows = np.flatnonzero(versions == version)
            inputs = self._predictor(int(version)).frame_inputs(features.iloc[rows])
            routed = router.predict(inputs, key=str(ids[rows[0]]))
            probs[rows] = routed.scores.ravel()
            versions[rows] = routed.version
        if not np.isfinite(probs).all():
            raise RecopsError(f"Triton returned {int((~np.isfinite(probs)).sum())} non-finite scores; check the "
                              "served versions (recops deploy --status)")
        return probs, versions

    def _router(self):
        from recops.serving.deploy import Router

        if "router" not in self._cache:
            self._cache["router"] = Router(self.config.server_url, self.repo, self.config.model_name)
        return self._cache["router"]

    def _predictor(self, version: int):
        """A client whose preprocessing is the one shipped with ``version`` (its preprocess.json)."""
        from recops.serving.client import Predictor
        from recops.serving.onnx_model import PREPROCESS_FILE
        from recops.training.preprocess import Preprocessor

        key = f"predictor-{version}"
        if key not in self._cache:
            path = self.repo.model_dir(self.config.model_name) / str(version) / PREPROCESS_FILE
            preprocessor = Preprocessor.from_dict(json.loads(path.read_text()))
            self._cache[key] = Predictor(self.config.server_url, self.config.model_name, preprocess=preprocessor.transform)
        return self._cache[key]

    def _reference(self):
        from recops.training.stats import load_reference

        key = f"reference-{self.state.production.dataset}"
        if key not in self._cache:
            self._cache[key] = load_reference(Path(self.state.production.dataset))
        return self._cache[key]

    def _keep_labelled_rows(self, index: int) -> None:
        """The window's rows with their feedback labels become training data (``data/window-*.tsv``)."""
        data = self.state_dir / "data"
        data.mkdir(exist_ok=True)
        target = data / window_path(self.config.stream_dir, index).name
        tmp = data / f".{target.name}.tmp"
        shutil.copyfile(window_path(self.config.stream_dir, index), tmp)
        os.replace(tmp, target)
        self.state.data_files[str(index)] = str(target.relative_to(self.state_dir))

    def _metrics_url(self) -> str | None:
        from recops.serving.server import read_state

        if self.config.metrics_url:
            return self.config.metrics_url
        running = read_state(self.repo.root)
        return running.metrics_url if running else None

    def _triton_figures(self) -> dict[str, Any] | None:
        """Requests, failures and mean latency per served version since the previous window (None without metrics)."""
        from recops.ops.online import scrape_triton

        url = self._metrics_url()
        if not url:
            return None
        try:
            scrape, now = scrape_triton(url), time.time()
        except RecopsError as exc:
            return {"error": str(exc)}
        before = self._last_scrape[1] if self._last_scrape else {}
        interval = now - self._last_scrape[0] if self._last_scrape else 0.0
        self._last_scrape = (now, scrape)
        return {version: stats.since(before.get((model, version)), interval)
                for (model, version), stats in scrape.items() if model == self.config.model_name}

    # ---- policy ------------------------------------------------------------------------------
    def _decide(self, index: int, record: dict[str, Any]) -> list[dict[str, Any]]:
        production = self.state.production
        arm = record["arms"].get(str(production.repo_version), {})
        if production.baseline_auc is None:
            production.set_baseline(arm.get("auc"), arm.get("logloss"), f"online, window {index}")
        new_rows = self._rows_since(production.since_window)
        decision = self.policy.decide(Observation(
            ts=record["ts"], model_version=str(production.repo_version), model_trained_at=production.since_ts,
            window=record["ts"], drifted_features=tuple(record["drifted"]), window_auc=arm.get("auc"),
            window_logloss=arm.get("logloss"), baseline_auc=production.baseline_auc,
            baseline_logloss=production.baseline_logloss, positives=arm.get("clicks"),
            negatives=arm["impressions"] - arm["clicks"] if arm else None, new_labelled_rows=new_rows))
        record["decision"] = {"trigger": decision.trigger, "reasons": decision.reasons}
        if self.exporter is not None:
            self.exporter.observe_policy(self.policy, decision)
        if not decision.trigger:
            return []
        windows = self._incident_windows(index, decision.fired)
        self.state.retrains += 1
        self.state.step = "retrain"
        self.state.candidate = {"id": self.state.retrains, "windows": windows, "trigger": decision.fired,
                                "run_dir": str(self.state_dir / "retrains" / f"{self.state.retrains:03d}")}
        return [{"kind": "retrain_started", "window": index, "windows": windows, "trigger": decision.fired,
                 "reason": f"policy fired ({', '.join(decision.fired)}): {'; '.join(decision.reasons[:len(decision.fired)])}; "
                           f"training on windows {windows[0]}..{windows[-1]}"}]

    def _rows_since(self, window: int) -> int:
        return sum(self._window_rows(int(w)) for w in self.state.data_files if int(w) >= window)

    def _window_rows(self, index: int) -> int:
        key = f"rows-{index}"
        if key not in self._cache:
            with open(self.state_dir / self.state.data_files[str(index)], "rb") as fh:
                self._cache[key] = sum(1 for line in fh if line.strip())
        return self._cache[key]

    def _incident_windows(self, index: int, fired: list[str]) -> list[int]:
        """The fired streak's windows, else those since production took over, clamped to the retrain bounds."""
        cfg, streaks = self.config.retrain, {"drift": self.policy.state.drift_streak, "quality": self.policy.state.quality_streak}
        span = max((streaks[k] for k in fired if k in streaks), default=index + 1 - self.state.production.since_window)
        span = min(max(span, cfg.min_windows), cfg.max_windows, index + 1)
        return list(range(index + 1 - span, index + 1))

    # ---- retrain -----------------------------------------------------------------------------
    def _retrain(self) -> list[dict[str, Any]]:
        from recops.training.dataset import ingest
        from recops.training.spec import PreprocessConfig

        candidate = self.state.candidate
        production = self.state.production
        manifest = json.loads((Path(production.dataset) / "manifest.json").read_text())
        files = [self.state_dir / self.state.data_files[str(w)] for w in candidate["windows"]]
        dataset = ingest(files, self.config.datasets, spec=self.spec,
                         config=PreprocessConfig.from_dict(manifest["preprocess"]))
        run_dir = Path(candidate["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        trained = self._sweep(dataset, run_dir) if self.config.retrain.use_sweep else self._fit(dataset, run_dir)
        candidate.update(dataset=str(dataset.path.resolve()), dataset_version=dataset.version,
                         rows=dataset.manifest["rows"], train_s=round(time.time() - started, 1), **trained)
        self.state.step = "validate"
        return self._commit({"kind": "retrain_finished", "registry_version": trained["registry_version"],
                             "method": trained["method"], "warm_start": trained["warm_start"],
                             "metrics": trained["metrics"],
                             "reason": f"{trained['method']} on {dataset.manifest['rows']['total']} rows "
                                       f"(dataset {dataset.version}, {trained['warm_start']}): val AUC "
                                       f"{_fmt(trained['metrics'].get('val_auc'))}; registered as v{trained['registry_version']}"})

    def _production_trainer(self) -> dict[str, Any]:
        return json.loads((Path(self.state.production.checkpoint) / "trainer.json").read_text())

    def _warm_start_problem(self, dataset) -> str | None:
        """Why the production checkpoint cannot seed training on ``dataset`` (None if it can)."""
        if not self.config.retrain.warm_start:
            return "warm start disabled"
        trainer = self._production_trainer()
        if trainer["model"]["tables"] != dataset.manifest["table_sizes"]:
            return "embedding tables differ from the production model's"
        if trainer["preprocessor"] != json.loads((dataset.path / "preprocessor.json").read_text()):
            return "preprocessing differs from the production model's"
        return None

    def _fit(self, dataset, run_dir: Path) -> dict[str, Any]:
        """``recops.training.train.fit``, seeded with the production weights and optimizer state when compatible."""
        from recops.ops.registry import CodeVersion, Lineage
        from recops.training import checkpoint
        from recops.training.environment import capture
        from recops.training.model import ModelConfig
        from recops.training.train import fit

        trainer = self._production_trainer()
        problem = self._warm_start_problem(dataset)
        latest = run_dir / "checkpoints" / "latest"
        if problem is None and not latest.exists():  # a resumed retraining continues from its own checkpoint
            parent = checkpoint.load(self.state.production.checkpoint)
            seeded = {**parent.trainer, "epoch": -1, "best_auc": -1.0, "stale": 0, "history": [],
                      "warm_start_from": str(parent.path)}
            checkpoint.save(latest, parent.model, parent.optim, seeded)
        arch = ModelConfig.from_dict({**trainer["model"], "tables": {}})
        result = fit(dataset.path, arch, self.config.retrain.train, run_dir, resume=True)
        best = max(result.history, key=lambda h: h["val_auc"])
        metrics = {"val_auc": best["val_auc"], "val_logloss": best["val_logloss"], "auc": result.auc,
                   "logloss": result.logloss}
        env = capture()
        parent_version = self.state.production.registry_version if problem is None else None
        lineage = Lineage(parent_version=parent_version, code=CodeVersion(env.code.git_sha, env.code.dirty),
                          libraries=env.libraries, hardware=env.hardware)
        params = {"model": {k: v for k, v in arch.to_dict().items() if k != "tables"},
                  "train": self.config.retrain.train.to_dict(), "retrained_from": self.state.production.repo_version}
        version = self.registry.register(Path(result.checkpoint), metrics, params, dataset.version, lineage)
        self.registry.set_alias(version.version, "candidate", reason=f"loop retraining {self.state.candidate['id']}")
        return {"method": "train", "registry_version": version.version, "checkpoint": str(version.checkpoint),
                "metrics": metrics, "warm_start": f"warm start from v{self.state.production.repo_version}"
                if problem is None else f"from scratch ({problem})"}

    def _sweep(self, dataset, run_dir: Path) -> dict[str, Any]:
        """A small Ray Tune sweep over the production architecture, warm-started when compatible."""
        import yaml

        from recops.ops.experiments import register_best
        from recops.training.sweep import run_sweep
        from recops.training.sweep_config import SweepConfig

        template = self.config.retrain.sweep_config
        base = yaml.safe_load(Path(template).read_text()) if template else DEFAULT_RETRAIN_SWEEP
        arch = {k: v for k, v in self._production_trainer()["model"].items() if k not in ("tables", "num_dense")}
        problem = self._warm_start_problem(dataset)
        if problem is None and self.state.production.registry_version is None:
            problem = "the production model is not in the registry"
        data = {**base, "name": f"retrain-{self.state.candidate['id']:03d}", "dataset": str(dataset.path),
                "model": arch, "search": {k: v for k, v in base.get("search", {}).items() if k not in arch},
                "storage_path": str(run_dir / "sweeps"),
                "warm_start": self.state.production.registry_version if problem is None else None}
        result = run_sweep(SweepConfig.from_dict(data),
                           warm_start=Path(self.state.production.checkpoint) if problem is None else None)
        if result.status == "interrupted" or result.best is None:
            raise RecopsError(f"retraining sweep {result.experiment_dir} ended {result.status} with "
                              f"{result.num_errors} failed trials" + ("" if result.best else " and no usable checkpoint"))
        version = register_best(result, self.registry, alias="candidate")
        metrics = {k: result.best_metrics[k] for k in ("val_auc", "val_logloss", "auc", "logloss") if k in result.best_metrics}
        return {"method": f"sweep of {len(result.trials)} trials", "registry_version": version.version,
                "checkpoint": str(version.checkpoint), "metrics": metrics, "sweep_id": result.sweep_id,
                "warm_start": f"warm start from v{self.state.production.repo_version}" if problem is None
                else f"from scratch ({problem})"}

    # ---- validate / export -------------------------------------------------------------------
    def _validate(self) -> list[dict[str, Any]]:
        from recops.serving.export import ParityError

        candidate = self.state.candidate
        try:
            report = validate_candidate(self._exported(), candidate["dataset"], self._production_version_dir() / "model.onnx",
                                        self._production_trainer(), self.config.gate)
        except ParityError as exc:
            report = {"passed": False, "failures": [f"ONNX parity: {exc}"], "parity": exc.report.to_dict()}
        candidate["validation"] = report
        if not report["passed"]:
            self.state.step, self.state.candidate = "observe", None
            self.registry.set_alias(candidate["registry_version"], "rejected", reason="; ".join(report["failures"]))
            return self._commit({"kind": "validation_failed", "registry_version": candidate["registry_version"],
                                 "validation": report, "production": self.state.production.repo_version,
                                 "reason": "; ".join(report["failures"]) + f"; production v{self.state.production.repo_version} keeps serving"})
        self.state.step = "export"
        return self._commit({"kind": "validation_passed", "registry_version": candidate["registry_version"],
                             "validation": report, "reason": report["summary"]})

    def _production_version_dir(self) -> Path:
        return self.repo.model_dir(self.config.model_name) / str(self.state.production.repo_version)

    def _exported(self):
        """The candidate's ONNX export (made once per process; again after a restart)."""
        from recops.serving.export import export_onnx

        key = f"exported-{self.state.candidate['id']}"
        if key not in self._cache:
            self._cache[key] = export_onnx(self.state.candidate["checkpoint"], Path(self.state.candidate["run_dir"]) / "export")
        return self._cache[key]

    def _export(self) -> list[dict[str, Any]]:
        from recops.serving.export import publish

        candidate = self.state.candidate
        if "repo_version" not in candidate:
            existing = self.repo.versions(self.config.model_name)
            candidate["repo_version"] = (existing[-1] if existing else 0) + 1
            self._commit()  # the planned version, so a rerun after a crash recognises its own export
        version = candidate["repo_version"]
        if version not in self.repo.versions(self.config.model_name):
            publish(self._exported(), self.repo, self.config.model_name, dataset=candidate["dataset"], version=version)
        self.state.step = "canary"
        return self._commit({"kind": "exported", "version": version, "registry_version": candidate["registry_version"],
                             "reason": f"registry v{candidate['registry_version']} passed the parity gate and is "
                                       f"{self.config.model_name} version {version} in {self.repo.root}"})

    # ---- canary ------------------------------------------------------------------------------
    def _deployer(self):
        from recops.serving.deploy import DeployConfig, Deployer
        from recops.serving.server import TritonServer

        return Deployer(TritonServer.attach(self.config.server_url), self.repo, self.config.model_name,
                        DeployConfig(drain_s=self.config.canary.drain_s))

    def _canary(self) -> list[dict[str, Any]]:
        from recops.serving.deploy import DeployError

        candidate, share = self.state.candidate, self.config.canary.share
        version = candidate["repo_version"]
        deployer = self._deployer()
        if deployer.state().canary != version:
            try:
                deployer.deploy(version, canary=share)
            except DeployError as exc:
                self.state.step, self.state.candidate = "observe", None
                return self._commit({"kind": "rolled_back", "version": version, "reason": f"canary refused: {exc}",
                                     "production": self.state.production.repo_version})
        self.state.canary = ModelRef(version, candidate["registry_version"], candidate["dataset"], candidate["checkpoint"],
                                     self.state.next_window, self.window_ts(self.state.next_window))
        self.state.canary_arms, self.state.step = [], "watch_canary"
        return self._commit({"kind": "canary_started", "version": version, "share": share,
                             "reason": f"version {version} serves {share:.0%} of keys beside production "
                                       f"v{self.state.production.repo_version} for {self.config.canary.windows} window(s)"})

    def _decide_canary(self) -> list[dict[str, Any]]:
        canary, production = self.state.canary, self.state.production
        verdict = compare_arms(self.state.canary_arms, str(production.repo_version), str(canary.repo_version),
                               self.config.canary)
        deployer = self._deployer()
        deployed = deployer.state()
        if verdict["promote"]:
            if deployed.production != canary.repo_version:
                deployer.promote()
            if canary.registry_version is not None:
                self.registry.set_alias(canary.registry_version, "production", reason=verdict["reason"])
            canary.since_window, canary.since_ts = self.state.next_window, self.window_ts(self.state.next_window)
            first = self.state.next_window - len(self.state.canary_arms)
            canary.set_baseline(verdict["canary"]["auc"], verdict["canary"]["logloss"],
                                f"online, canary windows {first}..{self.state.next_window - 1}")
            self.state.production, kind = canary, "promoted"
        else:
            if deployed.canary == canary.repo_version:
                deployer.rollback()
            if canary.registry_version is not None:
                self.registry.set_alias(canary.registry_version, "rejected", reason=verdict["reason"])
            kind = "rolled_back"
        self.state.canary, self.state.candidate, self.state.canary_arms, self.state.step = None, None, [], "observe"
        return self._commit({"kind": kind, "version": canary.repo_version, "previous": production.repo_version,
                             "production": self.state.production.repo_version, "comparison": verdict,
                             "reason": verdict["reason"]})


DEFAULT_RETRAIN_SWEEP: dict[str, Any] = {
    "train": {"batch_size": 512},
    "search": {"embedding_lr": {"choice": [0.02, 0.05]}},
    "epochs": 2, "num_samples": 2, "metric": "auc",
    "scheduler": {"type": "fifo"},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "max_failures": 0, "time_limit_s": 600,
}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def compare_arms(windows: list[dict[str, Any]], production: str, canary: str, config: CanaryConfig) -> dict[str, Any]:
    """Canary vs production over the canary windows (impression-weighted); promote unless it is worse."""
    figures = {}
    for arm, version in (("production", production), ("canary", canary)):
        rows = [w[version] for w in windows if version in w]
        figures[arm] = {"version": version, "impressions": sum(r["impressions"] for r in rows),
                        "auc": _weighted(rows, "auc"), "logloss": _weighted(rows, "logloss")}
    prod, cand = figures["production"], figures["canary"]
    failures = []
    if not cand["impressions"]:
        failures.append("the canary received no traffic")
    elif None in (cand["auc"], cand["logloss"]):
        failures.append("the canary's online AUC/logloss is undefined (one class only)")
    elif None not in (prod["auc"], prod["logloss"]):
        if cand["auc"] < prod["auc"] - config.auc_margin:
            failures.append(f"canary AUC {cand['auc']:.4f} < production {prod['auc']:.4f} - {config.auc_margin}")
        if cand["logloss"] > prod["logloss"] * (1 + config.logloss_margin):
            failures.append(f"canary logloss {cand['logloss']:.4f} > production {prod['logloss']:.4f} "
                            f"x {1 + config.logloss_margin:g}")
    summary = (f"canary v{canary} AUC {_fmt(cand['auc'])} logloss {_fmt(cand['logloss'])} ({cand['impressions']} rows) "
               f"vs production v{production} AUC {_fmt(prod['auc'])} logloss {_fmt(prod['logloss'])} ({prod['impressions']} rows)")
    reason = f"{summary}: " + ("; ".join(failures) + "; rolled back" if failures else "promoted")
    return {**figures, "promote": not failures, "failures": failures, "reason": reason}


def validate_candidate(exported, dataset_dir: str | Path, production_onnx: Path, production_trainer: dict[str, Any],
                       gate: GateConfig) -> dict[str, Any]:
    """The validation gate on the holdout of the candidate's NEW dataset: ONNX parity of ``exported``
    (``recops.serving.export.ExportedModel``), finite scores, AUC and slice AUC vs the served production ONNX
    (``production_trainer``: its checkpoint's trainer.json). Raises ``recops.serving.export.ParityError`` when the
    export does not reproduce the checkpoint.
    """
    from recops.serving.export import check_parity
    from recops.serving.onnx_model import FeatureLayout, onnx_probabilities, onnx_session
    from recops.training.dataset import Dataset
    from recops.training.metrics import logloss

    dataset = Dataset.open(dataset_dir)
    parity = check_parity(exported, dataset.path)
    if production_trainer["preprocessor"] != json.loads((dataset.path / "preprocessor.json").read_text()):
        raise RecopsError(f"the production model's preprocessing differs from the new dataset {dataset.path}'s; "
                          "the gate compares both models on the same processed holdout")
    holdout = dataset.split("test")
    n = min(len(holdout), gate.holdout_rows)
    labels = np.asarray(holdout.label[:n])

    def scores(onnx_path: Path, layout) -> np.ndarray:
        inputs = layout.features_inputs(holdout.dense[:n], holdout.sparse[:n], {k: v[:n] for k, v in holdout.multi.items()})
        return onnx_probabilities(onnx_session(onnx_path, threads=1), inputs).ravel().astype(np.float64)

    cand = scores(exported.onnx_path, exported.layout)
    prod = scores(production_onnx, FeatureLayout.from_trainer(production_trainer))
    failures = []
    if not np.isfinite(cand).all():
        failures.append(f"{int((~np.isfinite(cand)).sum())} non-finite candidate scores on the holdout")
        cand = np.nan_to_num(cand, nan=0.5)
    figures = {"rows": n, "auc": {"candidate": auc(labels, cand), "production": auc(labels, prod)},
               "logloss": {"candidate": logloss(labels, cand), "production": logloss(labels, prod)}}
    if not figures["auc"]["candidate"] >= figures["auc"]["production"] - gate.auc_margin:
        failures.append(f"holdout AUC {figures['auc']['candidate']:.4f} < production {figures['auc']['production']:.4f} "
                        f"- margin {gate.auc_margin}")
    slices = slice_aucs(labels, cand, prod, np.asarray(holdout.sparse[:n]), exported.layout.sparse, gate)
    failures += [f"slice {s['feature']}={s['id']} AUC {s['candidate']:.4f} < production {s['production']:.4f} "
                 f"- {gate.slice_margin}" for s in slices if s["collapsed"]]
    summary = (f"holdout ({n} rows of the new data) AUC {figures['auc']['candidate']:.4f} vs production "
               f"{figures['auc']['production']:.4f}, logloss {figures['logloss']['candidate']:.4f} vs "
               f"{figures['logloss']['production']:.4f}; parity max diff {parity.max_abs_diff:.2g}; "
               f"{len(slices)} slices checked")
    return {"passed": not failures, "failures": failures, "summary": summary, **figures, "slices": slices,
            "parity": parity.to_dict()}


def slice_aucs(labels: np.ndarray, cand: np.ndarray, prod: np.ndarray, sparse: np.ndarray,
               names: tuple[str, ...], gate: GateConfig) -> list[dict[str, Any]]:
    """AUC of both models on the most frequent values (ids) of each slice feature with enough rows of both classes."""
    out = []
    for feature in gate.slice_features:
        if feature not in names:
            raise RecopsError(f"gate slice feature {feature!r} is not a categorical feature ({', '.join(names)})")
        column = sparse[:, names.index(feature)]
        ids, counts = np.unique(column[column != 0], return_counts=True)
        for value in ids[np.argsort(-counts)][:gate.slice_top]:
            rows = column == value
            if rows.sum() < gate.slice_min_rows or labels[rows].min() == labels[rows].max():
                continue
            c, p = auc(labels[rows], cand[rows]), auc(labels[rows], prod[rows])
            out.append({"feature": feature, "id": int(value), "rows": int(rows.sum()), "candidate": c, "production": p,
                        "collapsed": bool(c < p - gate.slice_margin)})
    return out


def loop_config_dict(config: LoopConfig) -> dict[str, Any]:
    """``config`` as JSON-able values (for reports)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
