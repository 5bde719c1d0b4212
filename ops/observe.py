"""The loop's observe stage: one window of live traffic, scored through Triton and measured.

Each row is routed by its request id to the production or canary version (``recops.serving.deploy.Router``) and
scored through Triton with the preprocessing shipped with that version; predictions (with the raw features) and
feedback (the window's labels) are logged per window under ``logs/`` (``recops.ops.online``) and the labelled rows
kept as ``data/window-*.tsv`` (training data for a retraining). The window's record holds the online metrics per
arm, data drift against the production model's dataset reference, concept drift of the production arm against its
baseline (judged once, with ``DriftConfig``'s thresholds) and Triton's request figures.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recops.errors import RecopsError
from recops.files import atomic_path
from recops.ops.decision import fmt
from recops.ops.drift import ConceptVerdict, concept_drift, detect_drift
from recops.ops.exposition import Exporter
from recops.ops.loop_config import ObserveConfig
from recops.ops.loop_state import ModelRef
from recops.ops.online import OnlineConfig, log_feedback, log_predictions, read_online, scrape_triton
from recops.ops.policy import Observation
from recops.ops.stream import read_truth, window_path
from recops.serving.client import Predictor
from recops.serving.deploy import Router
from recops.serving.onnx_model import read_preprocessor
from recops.serving.repository import ModelRepository
from recops.serving.server import read_state
from recops.training.dataset import Dataset
from recops.training.metrics import auc
from recops.training.stats import Reference

ARM_FIGURES = ("impressions", "clicks", "ctr", "mean_prediction", "calibration", "auc", "logloss")


class Observer:
    """Scores and measures windows; keeps the server connections, per-version preprocessors and the reference."""

    def __init__(self, config: ObserveConfig, exporter: Exporter | None = None):
        self.config, self.exporter = config, exporter
        self.repo = ModelRepository(config.repo)
        self.router = Router(config.server_url, self.repo, config.model_name)
        self._predictors: dict[int, Predictor] = {}
        self._references: dict[str, Reference] = {}
        self._last_scrape: tuple[float, dict] | None = None

    def close(self) -> None:
        self.router.close()
        for predictor in self._predictors.values():
            predictor.close()
        self._predictors.clear()

    def observe(
        self, index: int, frame: pd.DataFrame, ts: float, production: ModelRef, canary: ModelRef | None
    ) -> tuple[dict[str, Any], ConceptVerdict | None]:
        """Process window ``index`` (its labelled rows ``frame``, starting at ``ts``): the ``window`` event's
        payload and the production arm's concept-drift verdict."""
        spec = Dataset.open(production.dataset).spec
        ids = np.array([f"w{index:05d}-{row:06d}" for row in range(len(frame))])
        features, labels = frame.drop(columns=[spec.label]), frame[spec.label].to_numpy()
        probs, versions = self._score(features, ids)
        online = self._log(index, ts, ids, probs, versions, features, labels)
        self._keep_labelled_rows(index)
        drift = detect_drift(self._reference(production.dataset), features, self.config.drift)
        arms = {w.model_version: {k: getattr(w, k) for k in ARM_FIGURES} for w in online.windows}
        prod_arm = arms.get(str(production.repo_version), {})
        concept = self._concept_drift(production, prod_arm)
        if self.exporter is not None:
            self.exporter.observe_online(online)
            self.exporter.observe_drift(drift)
            self.exporter.set_model(str(production.repo_version), production.since_ts)
        truth = read_truth(self.config.stream_dir, index)
        record = {
            "window": index,
            "ts": ts,
            "rows": len(frame),
            "production": production.repo_version,
            "canary": canary.repo_version if canary else None,
            "arms": arms,
            "drifted": drift.drifted_features,
            "drift": {
                f: {k: v[k] for k in ("test", "value", "threshold", "drifted")}
                for f, v in drift.to_dict()["features"].items()
            },
            "concept": concept.to_dict() if concept else None,
            "oracle_auc": auc(labels, truth) if truth is not None and len(truth) == len(labels) else None,
            "triton": self._triton_figures(),
            "reason": _summary(index, len(frame), production, canary, arms, drift.drifted_features),
        }
        return record, concept

    def _score(self, features: pd.DataFrame, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Route each row by its id (the deployment record's canary share) and score it through Triton."""
        routes = [self.router.route(str(key)) for key in ids]
        versions = np.array([v for v, _ in routes])
        probs = np.empty(len(ids), dtype=np.float64)
        for version in np.unique(versions):
            rows = np.flatnonzero(versions == version)
            inputs = self._predictor(int(version)).frame_inputs(features.iloc[rows])
            routed = self.router.predict(inputs, key=str(ids[rows[0]]))
            probs[rows] = routed.scores.ravel()
            versions[rows] = routed.version
        if not np.isfinite(probs).all():
            raise RecopsError(
                f"Triton returned {int((~np.isfinite(probs)).sum())} non-finite scores; check the "
                "served versions (recops deploy --status)"
            )
        return probs, versions

    def _predictor(self, version: int) -> Predictor:
        """A client whose preprocessing is the one shipped with ``version``."""
        if version not in self._predictors:
            preprocessor = read_preprocessor(self.repo.model_dir(self.config.model_name) / str(version))
            self._predictors[version] = Predictor(
                self.config.server_url, self.config.model_name, preprocess=preprocessor.transform
            )
        return self._predictors[version]

    def _log(
        self,
        index: int,
        ts: float,
        ids: np.ndarray,
        probs: np.ndarray,
        versions: np.ndarray,
        features: pd.DataFrame,
        labels: np.ndarray,
    ):
        logs = Path(self.config.state_dir) / "logs"
        logs.mkdir(exist_ok=True)
        predictions, feedback = logs / f"predictions-{index:05d}.jsonl", logs / f"feedback-{index:05d}.jsonl"
        for path in (predictions, feedback):  # a window processed again is logged afresh, never twice
            path.unlink(missing_ok=True)
        for version in np.unique(versions):
            rows = versions == version
            log_predictions(predictions, ids[rows], probs[rows], str(version), ts=ts + 1.0, features=features[rows])
        log_feedback(feedback, ids, labels, ts=ts + self.config.feedback_delay_s)
        window = self.config.window_s
        return read_online(predictions, feedback, OnlineConfig(window, window), now=ts + 2 * window)

    def _keep_labelled_rows(self, index: int) -> None:
        source = window_path(self.config.stream_dir, index)
        data = Path(self.config.state_dir) / "data"
        with atomic_path(data / source.name) as tmp:
            shutil.copyfile(source, tmp)

    def _reference(self, dataset: str) -> Reference:
        if dataset not in self._references:
            self._references[dataset] = Dataset.open(dataset).reference()
        return self._references[dataset]

    def _concept_drift(self, production: ModelRef, arm: dict[str, Any]) -> ConceptVerdict | None:
        if production.baseline_auc is None or arm.get("auc") is None or arm.get("logloss") is None:
            return None
        return concept_drift(
            arm["auc"],
            arm["logloss"],
            production.baseline_auc,
            production.baseline_logloss,
            self.config.drift,
            arm["clicks"],
            arm["impressions"] - arm["clicks"],
        )

    def _metrics_url(self) -> str | None:
        if self.config.metrics_url:
            return self.config.metrics_url
        running = read_state(self.repo.root)
        return running.metrics_url if running else None

    def _triton_figures(self) -> dict[str, Any] | None:
        """Requests, failures and mean latency per served version since the previous window (None without metrics)."""
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
        return {
            version: stats.since(before.get((model, version)), interval)
            for (model, version), stats in scrape.items()
            if model == self.config.model_name
        }


def _summary(
    index: int, rows: int, production: ModelRef, canary: ModelRef | None, arms: dict[str, Any], drifted: list[str]
) -> str:
    prod = arms.get(str(production.repo_version), {})
    text = (
        f"window {index}: {rows} rows, production v{production.repo_version} AUC {fmt(prod.get('auc'))} "
        f"logloss {fmt(prod.get('logloss'))}"
    )
    if canary:
        text += f", canary v{canary.repo_version} AUC {fmt(arms.get(str(canary.repo_version), {}).get('auc'))}"
    return text + (f"; drift in {', '.join(drifted)}" if drifted else "; no drift")


def drift_events(record: dict[str, Any], concept: ConceptVerdict | None) -> list[dict[str, Any]]:
    """A ``drift_detected`` event when the window drifted (data or concept), else none."""
    reasons = ([f"data drift in {', '.join(record['drifted'])}"] if record["drifted"] else []) + [
        f"concept drift: {r}" for r in (concept.reasons if concept and concept.drifted else [])
    ]
    return (
        [
            {
                "kind": "drift_detected",
                "window": record["window"],
                "features": record["drifted"],
                "reason": f"window {record['window']}: {'; '.join(reasons)}",
            }
        ]
        if reasons
        else []
    )


def labelled_rows(state_dir: Path, data_files: dict[str, str], since_window: int) -> int:
    """Labelled rows kept from window ``since_window`` on (the policy's ``rows`` condition)."""
    total = 0
    for window, path in data_files.items():
        if int(window) >= since_window:
            with open(Path(state_dir) / path, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
    return total


def policy_observation(
    record: dict[str, Any], concept: ConceptVerdict | None, production: ModelRef, new_rows: int
) -> Observation:
    """What the retraining policy sees of a window: drift, the concept-drift verdict, labelled rows, model age."""
    return Observation(
        ts=record["ts"],
        model_version=str(production.repo_version),
        model_trained_at=production.since_ts,
        window=record["ts"],
        drifted_features=tuple(record["drifted"]),
        concept_drifted=concept.drifted if concept else None,
        concept_reasons=tuple(concept.reasons) if concept else (),
        new_labelled_rows=new_rows,
    )
