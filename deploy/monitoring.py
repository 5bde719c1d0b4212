"""Scraping and alerting: ServiceMonitors and a PrometheusRule (Prometheus operator), or a plain Prometheus
configuration with the same jobs and the same rules.

The rules read recops' own gauges (ops/exposition.py, served by ``recops loop --metrics-port``) and
Triton's ``nv_inference_*`` counters."""

from __future__ import annotations

from recops.deploy.objects import LOOP, TRITON, Object, metadata, selector
from recops.deploy.values import Values

RULES_FILE = "recops-rules.yml"
_SCRAPED = ((TRITON, "triton"), (LOOP, "loop"))  # Service name, component; each has a port named "metrics"


def service_monitors(values: Values) -> list[Object]:
    """One ServiceMonitor per metrics Service: Triton's :metrics and the loop's /metrics."""
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": metadata(values, name, component, values.monitoring.labels),
            "spec": {
                "selector": {"matchLabels": selector(component)},
                "namespaceSelector": {"matchNames": [values.namespace]},
                "endpoints": [{"port": "metrics", "path": "/metrics", "interval": values.monitoring.interval}],
            },
        }
        for name, component in _SCRAPED
    ]


def _alert(name: str, expr: str, duration: str, severity: str, summary: str) -> Object:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {"summary": summary},
    }


def _per_model_rate(metric: str) -> str:
    return f"sum by (model) (rate({metric}[5m]))"


def alert_groups(values: Values) -> list[Object]:
    """The alert rules, as Prometheus rule groups."""
    m = values.monitoring
    failures = _per_model_rate("nv_inference_request_failure")
    successes = _per_model_rate("nv_inference_request_success")
    model = [
        _alert(
            "RecopsDriftDetected",
            "recops_drift_drifted_features > 0",
            "15m",
            "warning",
            "{{ $value }} features drifted from the training reference in the latest window",
        ),
        _alert(
            "RecopsOnlineAucDrop",
            f"max_over_time(recops_online_auc[{m.auc_window}]) - recops_online_auc > {m.auc_drop}",
            "10m",
            "warning",
            f"online AUC of version {{{{ $labels.model_version }}}} is more than {m.auc_drop} below its "
            f"{m.auc_window} maximum",
        ),
        _alert(
            "RecopsNoFeedback",
            "recops_online_clicks == 0 and recops_online_impressions > 0",
            m.no_feedback_for,
            "critical",
            "version {{ $labels.model_version }} gets impressions but no clicks: is feedback arriving?",
        ),
    ]
    serving = [
        _alert(
            "TritonInferenceFailures",
            f"{failures} / ({successes} + {failures}) > {m.triton_failure_ratio}",
            "5m",
            "critical",
            f"more than {m.triton_failure_ratio:.0%} of requests to {{{{ $labels.model }}}} fail",
        ),
        _alert(
            "TritonHighLatency",
            f"{_per_model_rate('nv_inference_request_duration_us')} / {successes} / 1000 > {m.triton_latency_ms}",
            "10m",
            "warning",
            f"mean request latency of {{{{ $labels.model }}}} is over {m.triton_latency_ms} ms",
        ),
    ]
    return [{"name": "recops-model", "rules": model}, {"name": "recops-triton", "rules": serving}]


def prometheus_rule(values: Values) -> list[Object]:
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": metadata(values, "recops", "monitoring", values.monitoring.labels),
            "spec": {"groups": alert_groups(values)},
        }
    ]


def prometheus_config(values: Values) -> list[Object]:
    """A prometheus.yml scraping the same Services through Kubernetes endpoint discovery, loading the rules."""

    def job(service: str) -> Object:
        return {
            "job_name": service,
            "metrics_path": "/metrics",
            "kubernetes_sd_configs": [{"role": "endpoints", "namespaces": {"names": [values.namespace]}}],
            "relabel_configs": [
                {
                    "source_labels": ["__meta_kubernetes_service_name", "__meta_kubernetes_endpoint_port_name"],
                    "regex": f"{service};metrics",
                    "action": "keep",
                }
            ],
        }

    interval = values.monitoring.interval
    return [
        {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [RULES_FILE],
            "scrape_configs": [job(service) for service, _ in _SCRAPED],
        }
    ]


def rules_file(values: Values) -> list[Object]:
    return [{"groups": alert_groups(values)}]
