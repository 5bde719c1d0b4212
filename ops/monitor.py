"""One window report of a served model: drift per feature, online quality per version, Triton figures.

Sources are a prediction log and a feedback log (``recops.ops.online`` JSONL; the prediction log carries the raw
features) and the production dataset's reference statistics; with a loop state dir (``recops.ops.loop``) the
latest processed window's logs and the production dataset are taken from the loop. Triton's
``/metrics`` adds request rates, failures and latency per served version.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recops.errors import RecopsError


@dataclass(frozen=True)
class MonitorSources:
    """Where one report reads from."""

    predictions: Path
    feedback: Path
    reference: Path  # processed dataset directory (its reference statistics)
    metrics_url: str | None = None
    model_name: str | None = None  # filter Triton's figures; None = every model
    window_s: float = 300.0
    max_delay_s: float = 3600.0

    @classmethod
    def from_loop(cls, state_dir: Path, metrics_url: str | None = None) -> MonitorSources:
        """The latest window a loop processed, against its production model's dataset."""
        from recops.ops.loop_state import CONFIG_FILE, STATE_FILE

        state_dir = Path(state_dir)
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
            config = json.loads((state_dir / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise RecopsError(
                f"{state_dir} is not a loop state dir ({exc}); pass the --state-dir of `recops loop`"
            ) from exc
        index = state["next_window"] - 1
        if index < 0:
            raise RecopsError(f"loop {state_dir} has processed no window yet; run `recops loop` first")
        logs = state_dir / "logs"
        return cls(
            logs / f"predictions-{index:05d}.jsonl",
            logs / f"feedback-{index:05d}.jsonl",
            Path(state["production"]["dataset"]),
            metrics_url or config.get("metrics_url") or _server_metrics(config),
            config["model_name"],
            float(config["window_s"]),
            float(config["window_s"]),
        )


def _server_metrics(config: dict[str, Any]) -> str | None:
    from recops.serving.server import read_state

    running = read_state(Path(config["repo"]))
    return running.metrics_url if running else None


class Monitor:
    """Builds window reports; keeps the previous Triton scrape so rates cover the time between reports."""

    def __init__(self, sources: MonitorSources):
        from recops.training.stats import load_reference

        self.sources = sources
        self.reference = load_reference(sources.reference)
        self.spec = self.reference.spec  # the dataset's schema, recorded with its reference statistics
        self._scrape: tuple[float, dict] | None = None
        self._predictions, self._feedback = self._follow(sources)

    def _follow(self, sources: MonitorSources):
        """Incremental readers of both logs, keeping what the newest complete window can still need."""
        from recops.ops.online import LogFollower, parse_feedback, prediction_parser

        keep_s = sources.max_delay_s + 2 * sources.window_s
        return (
            LogFollower(sources.predictions, prediction_parser(self.spec), keep_s),
            LogFollower(sources.feedback, parse_feedback, keep_s),
        )

    def report(self) -> dict[str, Any]:
        from recops.ops.drift import detect_drift
        from recops.ops.online import OnlineConfig, online_metrics

        src = self.sources
        if not src.predictions.is_file():
            raise RecopsError(f"prediction log {src.predictions} does not exist; pass the log the scorer writes")
        predictions, feedback = self._predictions.read(), self._feedback.read()
        torn = self._predictions.torn_bytes
        if predictions.empty:
            raise RecopsError(f"prediction log {src.predictions} holds no complete record yet")
        online = online_metrics(predictions, feedback, OnlineConfig(src.window_s, src.max_delay_s))
        latest = predictions["ts"] // src.window_s == (predictions["ts"] // src.window_s).max()
        current = predictions[latest]
        drift = detect_drift(self.reference, current)
        return {
            "rows": int(len(current)),
            "window_start": float((current["ts"] // src.window_s).max() * src.window_s),
            "torn_bytes": torn,
            "online": online,
            "drift": drift,
            "triton": self._triton(),
        }

    def _triton(self) -> dict[str, Any] | None:
        from recops.ops.online import scrape_triton

        if not self.sources.metrics_url:
            return None
        try:
            scrape, now = scrape_triton(self.sources.metrics_url), time.time()
        except RecopsError as exc:  # the server may be gone while its logs remain: report the rest
            return {"error": str(exc)}
        before, since = (self._scrape[1], now - self._scrape[0]) if self._scrape else ({}, 0.0)
        self._scrape = (now, scrape)
        return {
            f"{model}/{version}": stats.since(before.get((model, version)), since)
            for (model, version), stats in scrape.items()
            if self.sources.model_name in (None, model)
        }

    def close(self) -> None:
        """Close the log files being followed."""
        self._predictions.close()
        self._feedback.close()


def report_dict(report: dict[str, Any]) -> dict[str, Any]:
    """A report as JSON-able values."""
    online = report["online"]
    latest = {w.model_version: w.to_dict() for w in online.complete_windows()}
    return {
        "rows": report["rows"],
        "window_start": report["window_start"],
        "torn_bytes": report["torn_bytes"],
        "online": {
            "latest_complete": latest,
            "orphan_feedback": online.orphan_feedback,
            "expired_feedback": online.expired_feedback,
            "pending": sum(w.pending for w in online.windows),
        },
        "drift": report["drift"].to_dict(),
        "triton": report["triton"],
    }


def format_report(data: dict[str, Any]) -> str:
    """The human view of ``report_dict``: drifted features first, then quality and serving per version."""
    lines = [f"window starting {data['window_start']:.0f}: {data['rows']} predictions"]
    features = data["drift"]["features"]
    drifted = data["drift"]["drifted_features"]
    lines.append(
        f"drift: {len(drifted)} of {len(features)} features drifted" + (f" ({', '.join(drifted)})" if drifted else "")
    )
    ranked = sorted(features.items(), key=lambda kv: -(kv[1]["value"] or 0) / (kv[1]["threshold"] or 1))
    for name, row in ranked[: max(5, len(drifted))]:
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(
            f"  {name:<6} {row['test']:<8} {value:>8} / {row['threshold']:.4f}  {'DRIFT' if row['drifted'] else ''}"
        )
    lines.append("online (latest complete window per version):")
    for version, w in data["online"]["latest_complete"].items():
        lines.append(
            f"  v{version}: {w['impressions']} impressions, CTR {_f(w['ctr'])}, AUC {_f(w['auc'])}, "
            f"logloss {_f(w['logloss'])}, calibration {_f(w['calibration'])}"
        )
    lines.append(
        f"  pending feedback {data['online']['pending']}, orphan {data['online']['orphan_feedback']}, "
        f"expired {data['online']['expired_feedback']}"
    )
    if data["triton"] is not None and "error" in data["triton"]:
        lines.append(f"triton: {data['triton']['error']}")
    elif data["triton"] is not None:
        lines.append("triton (since the previous report, or since the server started):")
        for key, t in data["triton"].items():
            lines.append(
                f"  {key}: {t['requests']:.0f} requests, {t['failures']:.0f} failures, mean latency "
                f"{_f(t['mean_latency_ms'], 2)} ms (queue {_f(t['mean_queue_ms'], 2)} ms), "
                f"{_f(t['requests_per_s'], 1)} req/s"
            )
    return "\n".join(lines)


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"
