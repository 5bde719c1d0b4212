"""One Prometheus ``/metrics`` endpoint for recops: online quality, drift, GPU, policy, model version.

``Exporter`` owns a registry (not the process-global one, so several can coexist in tests) and is
fed by the closed loop after each evaluation; Triton's own ``nv_inference_*`` metrics are scraped by
Prometheus from Triton directly. ``ops/dashboards/recops_grafana.json`` charts both.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from recops.errors import RecopsError
from recops.ops.decision import Decision
from recops.ops.drift import DriftReport
from recops.ops.gpu import GpuMonitor
from recops.ops.online import OnlineReport
from recops.ops.policy import CONDITIONS, RetrainPolicy

_WINDOW_FIGURES = {  # WindowMetrics field -> (metric, help)
    "ctr": ("recops_online_ctr", "observed click-through rate of the latest complete window"),
    "mean_prediction": ("recops_online_mean_prediction", "mean predicted probability of the latest complete window"),
    "calibration": ("recops_online_calibration", "mean prediction / observed CTR (1 = calibrated)"),
    "auc": ("recops_online_auc", "AUC of the latest complete window"),
    "logloss": ("recops_online_logloss", "logloss of the latest complete window"),
    "impressions": ("recops_online_impressions", "impressions in the latest complete window"),
    "clicks": ("recops_online_clicks", "clicks in the latest complete window"),
    "late_feedback": ("recops_online_late_feedback", "feedback that arrived after the window closed (attributed)"),
    "missing_feedback": (
        "recops_online_missing_feedback",
        "impressions without feedback after the max delay (non-clicks)",
    ),
    "window_end": ("recops_online_window_end_timestamp_seconds", "end of the latest complete window"),
}


class Exporter:
    """Gauges for the latest recops figures on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.window = {k: gauge(n, d, ("model_version",)) for k, (n, d) in _WINDOW_FIGURES.items()}
        self.pending = gauge(
            "recops_online_pending_impressions", "impressions still waiting for feedback", ("model_version",)
        )
        self.orphan = gauge("recops_online_orphan_feedback", "feedback events for unknown request ids")
        self.expired = gauge("recops_online_expired_feedback", "feedback events later than the max delay (ignored)")
        self.drift_value = gauge("recops_drift_value", "drift test statistic per feature", ("feature", "test"))
        self.drift_threshold = gauge("recops_drift_threshold", "drift test threshold per feature", ("feature", "test"))
        self.drift_detected = gauge(
            "recops_drift_detected", "1 if the feature drifted in the latest report", ("feature",)
        )
        self.drifted = gauge("recops_drift_drifted_features", "number of drifted features in the latest report")
        self.drift_rows = gauge("recops_drift_current_rows", "rows in the latest drift report's current data")
        self.streak = gauge("recops_policy_streak", "consecutive windows meeting a condition", ("condition",))
        self.latched = gauge(
            "recops_policy_latched", "1 if the condition is latched by the current incident", ("condition",)
        )
        self.triggers = gauge("recops_policy_triggers", "retrainings triggered since the policy state began")
        self.last_trigger = gauge("recops_policy_last_trigger_timestamp_seconds", "time of the last retrain trigger")
        self.last_decision = gauge(
            "recops_policy_last_decision_trigger", "1 if the latest decision triggered retraining"
        )
        self.model = gauge("recops_model_info", "the serving model version (value 1)", ("version",))
        self.model_trained = gauge("recops_model_trained_timestamp_seconds", "when the serving model was trained")

    def observe_online(self, report: OnlineReport) -> None:
        """The latest complete window per model version, and pending impressions of later windows."""
        latest = {w.model_version: w for w in report.complete_windows()}
        for metric in (*self.window.values(), self.pending):
            metric.clear()
        for version, w in latest.items():
            for field, metric in self.window.items():
                value = getattr(w, field)
                if value is not None:
                    metric.labels(version).set(value)
        for w in report.windows:
            self.pending.labels(w.model_version).inc(w.pending)
        self.orphan.set(report.orphan_feedback)
        self.expired.set(report.expired_feedback)

    def observe_drift(self, report: DriftReport) -> None:
        for metric in (self.drift_value, self.drift_threshold, self.drift_detected):
            metric.clear()
        flagged = set(report.drifted_features)
        for t in report.tests:
            self.drift_value.labels(t.feature, t.test).set(t.value)
            self.drift_threshold.labels(t.feature, t.test).set(t.threshold)
        for feature in report.features:
            self.drift_detected.labels(feature).set(float(feature in flagged))
        self.drifted.set(len(flagged))
        self.drift_rows.set(report.current_rows)

    def observe_policy(self, policy: RetrainPolicy, decision: Decision | None = None) -> None:
        state = policy.state
        self.streak.labels("drift").set(state.drift_streak)
        self.streak.labels("quality").set(state.quality_streak)
        for condition in CONDITIONS:
            self.latched.labels(condition).set(float(condition in state.latched))
        self.triggers.set(state.triggers)
        if state.last_trigger_ts is not None:
            self.last_trigger.set(state.last_trigger_ts)
        if decision is not None:
            self.last_decision.set(float(decision.verdict == "retrain"))

    def set_model(self, version: str, trained_at: float) -> None:
        self.model.clear()
        self.model.labels(str(version)).set(1)
        self.model_trained.set(trained_at)

    def attach_gpu(self, monitor: GpuMonitor) -> None:
        """Export the monitor's latest reading as ``recops_gpu_*`` gauges."""
        self.registry.register(monitor)


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint."""

    server: Any
    thread: threading.Thread
    addr: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (an :class:`Exporter`'s) on ``addr:port`` (0 = any free port) in a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry or CollectorRegistry())
    except OSError as exc:
        raise RecopsError(f"metrics server {addr}:{port}: cannot bind ({exc}); pick a free --metrics-port") from exc
    return MetricsServer(server, thread, addr)
