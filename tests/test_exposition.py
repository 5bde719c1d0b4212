"""The recops /metrics endpoint fed by real drift, online, policy and GPU objects, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recops.errors import RecopsError
from recops.ops.drift import detect_drift
from recops.ops.exposition import Exporter, start_metrics_server
from recops.ops.gpu import GpuMonitor
from recops.ops.online import OnlineConfig, online_metrics
from recops.ops.policy import Observation, PolicyConfig, RetrainPolicy
from recops.training.spec import ColumnSpec
from recops.training.stats import load_reference, save_reference
from recops.training.synth import SynthConfig, generate, to_table

DASHBOARD = Path(__file__).resolve().parents[1] / "ops" / "dashboards" / "recops_grafana.json"
TRITON_TEXT = (Path(__file__).parent / "data" / "triton_metrics.txt").read_text()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{metric family: {sorted label items: value}}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


@pytest.fixture
def exporter(tmp_path: Path) -> Exporter:
    save_reference(tmp_path, to_table(generate(SynthConfig(rows=5_000, seed=0))).to_pandas(), ColumnSpec.criteo())
    live = to_table(generate(SynthConfig(rows=2_000, seed=1, covariate_drift=0.5))).to_pandas()
    exporter = Exporter()
    exporter.observe_drift(detect_drift(load_reference(tmp_path), live))
    predictions = pd.DataFrame(
        {"request_id": ["a", "b", "c", "d"], "ts": [0.0, 1, 2, 70], "model_version": "3", "prob": [0.8, 0.3, 0.6, 0.5]}
    )
    feedback = pd.DataFrame({"request_id": ["a", "b", "x"], "ts": [5.0, 6, 7], "clicked": [1, 0, 1]})
    exporter.observe_online(online_metrics(predictions, feedback, OnlineConfig(window_s=60, max_delay_s=100), now=150))
    policy = RetrainPolicy(PolicyConfig(drift_windows=1))
    exporter.observe_policy(
        policy,
        policy.decide(
            Observation(ts=100.0, model_version="3", model_trained_at=50.0, window=0.0, drifted_features=("I1",))
        ),
    )
    exporter.set_model("3", 50.0)
    exporter.attach_gpu(GpuMonitor())
    return exporter


def test_metrics_endpoint_serves_every_figure(exporter: Exporter) -> None:
    server = start_metrics_server(0, registry=exporter.registry)
    try:
        metrics = scrape(server.url)
        with pytest.raises(RecopsError, match="cannot bind"):
            start_metrics_server(server.port)
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)
    v3 = (("model_version", "3"),)
    assert metrics["recops_online_ctr"] == {v3: pytest.approx(1 / 3)} and metrics["recops_online_auc"] == {v3: 1.0}
    assert metrics["recops_online_missing_feedback"] == {v3: 1.0} and metrics["recops_online_pending_impressions"] == {
        v3: 1.0
    }
    assert metrics["recops_online_orphan_feedback"] == {(): 1.0}
    assert (
        metrics["recops_drift_detected"][(("feature", "I1"),)] == 1.0
        and metrics["recops_drift_detected"][(("feature", "I7"),)] == 0.0
    )
    assert (
        metrics["recops_drift_drifted_features"][()] >= 5
        and (("feature", "C3"), ("test", "js")) in metrics["recops_drift_value"]
    )
    assert (
        metrics["recops_policy_triggers"] == {(): 1.0}
        and metrics["recops_policy_latched"][(("condition", "drift"),)] == 1.0
    )
    assert metrics["recops_model_info"] == {(("version", "3"),): 1.0} and metrics[
        "recops_model_trained_timestamp_seconds"
    ] == {(): 50.0}
    assert "recops_gpu_available" in metrics


def test_dashboard_charts_only_metrics_that_exist(exporter: Exporter) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    server = start_metrics_server(0, registry=exporter.registry)
    try:
        exposed = set(scrape(server.url))
    finally:
        server.stop()
    exposed |= {f.name for f in text_string_to_metric_families(TRITON_TEXT)}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b((?:recops|nv)_[a-z_]+)\b", e)}
    assert used and not (used - exposed), f"dashboard uses metrics nobody exposes: {sorted(used - exposed)}"
    assert {
        "recops_online_auc",
        "recops_drift_value",
        "recops_gpu_utilization_percent",
        "nv_inference_request_duration_us",
    } <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(
        p.get("datasource", {}).get("uid", "${DS_PROMETHEUS}") == "${DS_PROMETHEUS}" for p in dashboard["panels"]
    )
