"""Online model quality from prediction and feedback logs, and Triton's serving figures.

Logs are append-only JSONL files, one object per line, appended under a file lock in single writes
(so concurrent writers never interleave lines):

- prediction log: ``{"request_id": str, "ts": unix seconds, "model_version": str, "prob": float,
  "features": {column: raw value, ...}}`` (``features`` optional: the raw spec columns, for drift);
- feedback log: ``{"request_id": str, "ts": unix seconds, "clicked": 0 | 1}``.

Attribution rules (``OnlineConfig``):

- a prediction belongs to the window ``floor(ts / window_s)``; windows are per model version;
- feedback counts when it arrives at most ``max_delay_s`` after its prediction; a request is a click
  if any counted feedback says so. Counted feedback that arrives after the prediction's window has
  closed is **late**: still attributed to the prediction's window, and counted;
- feedback arriving later than ``max_delay_s`` is **expired** (ignored, counted); feedback for an
  unknown request id is **orphan** (counted); a request id logged twice keeps its first prediction;
- an impression without counted feedback once ``max_delay_s`` has passed is **missing feedback** and
  counts as a non-click (click logs usually only record clicks); before that it is **pending**;
- a window is complete when nothing in it is pending; quality figures (CTR, AUC, logloss,
  calibration = mean prediction / observed CTR) are only given for complete windows, since early
  feedback is biased towards clicks.

A line still being written (no trailing newline yet) is not read; ``torn_bytes`` reports it. Long-running
readers follow the logs with :class:`LogFollower` (incremental, bounded, rotation-aware).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
from filelock import FileLock

from recops.errors import RecopsError
from recops.training.metrics import auc, logloss
from recops.training.spec import ColumnSpec

PREDICTION_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("ts", pa.float64()), ("model_version", pa.string()), ("prob", pa.float64())]
)
FEEDBACK_SCHEMA = pa.schema([("request_id", pa.string()), ("ts", pa.float64()), ("clicked", pa.int8())])


@dataclass(frozen=True)
class OnlineConfig:
    """Windowing and feedback attribution."""

    window_s: float = 300.0
    max_delay_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.max_delay_s < 0:
            raise RecopsError(
                f"online config: window_s must be > 0 and max_delay_s >= 0, got {self.window_s}, {self.max_delay_s}"
            )


# ---------------------------------------------------------------------------------------------- logs


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records as JSON lines in one locked write; returns how many were written."""
    path = Path(path)
    lines = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"), open(path, "a", encoding="utf-8") as fh:
        fh.write(lines)
    return lines.count("\n")


def log_predictions(
    path: Path,
    request_ids: Iterable,
    probs: Iterable[float],
    model_version: str,
    ts: float | None = None,
    features: pd.DataFrame | None = None,
) -> int:
    """Append one prediction record per request (``features``: the raw rows, same order, optional)."""
    ts = time.time() if ts is None else ts
    rows = features.astype(object).where(features.notna(), None).to_dict("records") if features is not None else None
    records = []
    for i, (rid, p) in enumerate(zip(request_ids, probs)):
        record = {"request_id": str(rid), "ts": float(ts), "model_version": str(model_version), "prob": float(p)}
        if rows is not None:
            record["features"] = rows[i]
        records.append(record)
    return append_jsonl(path, records)


def log_feedback(path: Path, request_ids: Iterable, clicked: Iterable, ts: float | None = None) -> int:
    """Append one feedback record per request id."""
    ts = time.time() if ts is None else ts
    return append_jsonl(
        path, ({"request_id": str(r), "ts": float(ts), "clicked": int(bool(c))} for r, c in zip(request_ids, clicked))
    )


def _complete_lines(data: bytes) -> tuple[bytes, int]:
    """The complete lines of ``data`` and the length of the torn tail after them."""
    end = data.rfind(b"\n") + 1
    return data[:end], len(data) - end


def _parse_table(data: bytes, schema: pa.Schema, source: Path) -> pa.Table:
    """Complete JSONL lines with ``schema``'s fields (others ignored)."""
    if not data.strip():
        return schema.empty_table()
    try:
        options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        table = pajson.read_json(io.BytesIO(data), parse_options=options)
    except pa.ArrowInvalid as exc:
        raise RecopsError(
            f"log {source}: not valid JSONL for fields {schema.names} ({exc}); fix or move the bad lines"
        ) from exc
    required = [n for n in schema.names if n != "features"]
    lacking = [n for n in required if table.column(n).null_count]
    if lacking:
        raise RecopsError(f"log {source}: records lack {lacking}; every record needs {required}")
    return table


def prediction_parser(spec: ColumnSpec | None = None) -> Callable[[bytes, Path], pd.DataFrame]:
    """Complete prediction-log lines -> a frame; with ``spec``, the logged raw features too, as the spec's
    columns (dense float with NaN, categorical str/None: the drift detector's input)."""
    if spec is None:
        return lambda data, source: _parse_table(data, PREDICTION_SCHEMA, source).to_pandas()
    fields = [pa.field(n, pa.float64()) for n in spec.dense] + [
        pa.field(n, pa.string()) for n in (*spec.sparse, *spec.multi_hot)
    ]
    schema = PREDICTION_SCHEMA.append(pa.field("features", pa.struct(fields)))
    categorical = [f.name for f in fields if f.type == pa.string()]

    def parse(data: bytes, source: Path) -> pd.DataFrame:
        table = _parse_table(data, schema, source).flatten()
        frame = table.rename_columns([n.removeprefix("features.") for n in table.column_names]).to_pandas()
        frame[categorical] = frame[categorical].astype(object).where(frame[categorical].notna(), None)
        return frame

    return parse


def parse_feedback(data: bytes, source: Path) -> pd.DataFrame:
    """Complete feedback-log lines -> a frame."""
    return _parse_table(data, FEEDBACK_SCHEMA, source).to_pandas()


def _read_log(path: Path, parse: Callable[[bytes, Path], pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    data, torn = _complete_lines(Path(path).read_bytes() if Path(path).is_file() else b"")
    return parse(data, Path(path)), torn


def read_predictions(path: Path, spec: ColumnSpec | None = None) -> tuple[pd.DataFrame, int]:
    """The whole prediction log (see :func:`prediction_parser`) and its torn tail bytes."""
    return _read_log(path, prediction_parser(spec))


def read_feedback(path: Path) -> tuple[pd.DataFrame, int]:
    """The whole feedback log and its torn tail bytes."""
    return _read_log(path, parse_feedback)


class LogFollower:
    """Reads a growing JSONL log incrementally, for long-running monitors: each :meth:`read` parses only the
    lines appended since the last one and keeps the records of the last ``keep_s`` seconds (by ``ts``), so
    time and memory per read stay bounded however long the log grows. A rotated log (the path now names
    another file: logrotate's rename-and-create) is followed: the old file is read to its end first, then
    the new one from its start. A truncated log is read again from its start; records already read are kept either
    way."""

    def __init__(self, path: Path, parse: Callable[[bytes, Path], pd.DataFrame], keep_s: float):
        self.path, self.keep_s, self._parse = Path(path), keep_s, parse
        self._fh: BinaryIO | None = None
        self._pending = b""  # a torn tail line, completed by a later read
        self._frame: pd.DataFrame | None = None  # the records kept

    @property
    def torn_bytes(self) -> int:
        return len(self._pending)

    def read(self) -> pd.DataFrame:
        """The records kept so far, including the ones appended since the last read."""
        data = self._drain()
        if self._rotated():
            self._fh.close()
            self._fh, self._pending = None, b""  # a line torn at rotation was never finished
            data += self._drain()
        buffered = self._pending + data
        complete, _ = _complete_lines(buffered)
        self._pending = buffered[len(complete) :]
        new = self._parse(complete, self.path)
        frame = new if self._frame is None else pd.concat([self._frame, new], ignore_index=True)
        if len(frame):
            frame = frame[frame["ts"] >= frame["ts"].max() - self.keep_s].reset_index(drop=True)
        self._frame = frame
        return frame

    def _drain(self) -> bytes:
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")  # noqa: SIM115 - held open across reads; closed in close()
            except FileNotFoundError:
                return b""
        if os.fstat(self._fh.fileno()).st_size < self._fh.tell():  # truncated in place (copytruncate): start over
            self._fh.seek(0)
            self._pending = b""
        return self._fh.read()

    def _rotated(self) -> bool:
        try:
            return self._fh is not None and os.stat(self.path).st_ino != os.fstat(self._fh.fileno()).st_ino
        except FileNotFoundError:
            return False  # moved away and not yet re-created: keep reading the old one

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class WindowMetrics:
    """One window of one model version."""

    window_start: float
    window_end: float
    model_version: str
    impressions: int
    feedback: int  # impressions with counted feedback
    clicks: int
    late_feedback: int  # counted feedback that arrived after the window closed
    missing_feedback: int  # no feedback after max_delay_s: counted as non-clicks
    pending: int  # no feedback yet, max_delay_s not yet passed
    complete: bool
    ctr: float | None
    mean_prediction: float
    calibration: float | None  # mean prediction / observed CTR (1 = calibrated)
    auc: float | None
    logloss: float | None

    @property
    def positives(self) -> int:
        return self.clicks

    @property
    def negatives(self) -> int:
        return self.impressions - self.clicks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OnlineReport:
    """Windowed metrics plus the log events that match no window."""

    windows: list[WindowMetrics]
    orphan_feedback: int  # feedback for request ids never predicted
    expired_feedback: int  # feedback later than max_delay_s: ignored
    duplicate_predictions: int  # repeated request ids in the prediction log: first kept
    now: float

    def complete_windows(self, model_version: str | None = None) -> list[WindowMetrics]:
        return [w for w in self.windows if w.complete and (model_version is None or w.model_version == model_version)]

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "windows"},
            "windows": [w.to_dict() for w in self.windows],
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _labels(predictions: pd.DataFrame, feedback: pd.DataFrame, config: OnlineConfig) -> tuple[pd.DataFrame, int, int]:
    """Per prediction: counted-feedback label and first arrival; plus orphan and expired feedback counts."""
    joined = feedback.merge(predictions[["request_id", "ts"]], on="request_id", how="left", suffixes=("", "_pred"))
    orphan = int(joined["ts_pred"].isna().sum())
    joined = joined[joined["ts_pred"].notna()]
    in_time = (joined["ts"] - joined["ts_pred"]) <= config.max_delay_s
    counted = joined[in_time].groupby("request_id").agg(clicked=("clicked", "max"), arrived=("ts", "min"))
    return counted, orphan, int((~in_time).sum())


def _window(group: pd.DataFrame, start: float, version: str, config: OnlineConfig, now: float) -> WindowMetrics:
    end = start + config.window_s
    has = group["clicked"].notna()
    overdue = (now - group["ts"]) >= config.max_delay_s
    labels = group["clicked"].fillna(0).to_numpy(np.float64)
    probs = group["prob"].to_numpy(np.float64)
    pending = int((~has & ~overdue).sum())
    clicks = int(labels[has | overdue].sum())
    complete = pending == 0
    ctr = clicks / len(group) if complete else None
    return WindowMetrics(
        window_start=start,
        window_end=end,
        model_version=version,
        impressions=len(group),
        feedback=int(has.sum()),
        clicks=clicks,
        late_feedback=int((has & (group["arrived"] >= end)).sum()),
        missing_feedback=int((~has & overdue).sum()),
        pending=pending,
        complete=complete,
        ctr=ctr,
        mean_prediction=float(probs.mean()),
        calibration=_finite(probs.mean() / ctr) if ctr else None,
        auc=_finite(auc(labels, probs)) if complete else None,
        logloss=logloss(labels, probs) if complete else None,
    )


def online_metrics(
    predictions: pd.DataFrame, feedback: pd.DataFrame, config: OnlineConfig | None = None, now: float | None = None
) -> OnlineReport:
    """Windowed CTR/AUC/logloss/calibration per model version under the module's attribution rules."""
    config = config or OnlineConfig()
    now = time.time() if now is None else now
    unique = predictions.drop_duplicates("request_id", keep="first")
    counted, orphan, expired = _labels(unique, feedback, config)
    rows = unique.join(counted, on="request_id")
    rows["window"] = np.floor(rows["ts"] / config.window_s) * config.window_s
    windows = [
        _window(g, float(start), str(version), config, now)
        for (start, version), g in rows.groupby(["window", "model_version"], sort=True)
    ]
    return OnlineReport(windows, orphan, expired, len(predictions) - len(unique), now)


def read_online(
    prediction_log: Path, feedback_log: Path, config: OnlineConfig | None = None, now: float | None = None
) -> OnlineReport:
    """:func:`online_metrics` over the two JSONL logs."""
    predictions, _ = read_predictions(prediction_log)
    feedback, _ = read_feedback(feedback_log)
    return online_metrics(predictions, feedback, config, now)


# ------------------------------------------------------------------------------------------- triton

_TRITON_COUNTERS = {
    "nv_inference_request_success": "success",
    "nv_inference_request_failure": "failure",
    "nv_inference_count": "inferences",
    "nv_inference_exec_count": "executions",
    "nv_inference_request_duration_us": "request_duration_us",
    "nv_inference_queue_duration_us": "queue_duration_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_duration_us",
}


@dataclass(frozen=True)
class TritonModelStats:
    """Triton's cumulative counters of one model version (since the server started)."""

    model: str
    version: str
    success: float = 0.0
    failure: float = 0.0
    inferences: float = 0.0
    executions: float = 0.0
    request_duration_us: float = 0.0
    queue_duration_us: float = 0.0
    compute_infer_duration_us: float = 0.0

    def since(self, earlier: TritonModelStats | None, interval_s: float) -> dict[str, Any]:
        """Rates and mean latencies between an earlier scrape and this one (all-time when None)."""
        base = earlier or TritonModelStats(self.model, self.version)
        d = {k: getattr(self, k) - getattr(base, k) for k in _TRITON_COUNTERS.values()}
        if d["success"] < 0:  # the server restarted: counters began again from zero
            d = {k: getattr(self, k) for k in _TRITON_COUNTERS.values()}
        requests = d["success"] + d["failure"]
        return {
            "model": self.model,
            "version": self.version,
            "requests": requests,
            "failures": d["failure"],
            "requests_per_s": requests / interval_s if interval_s > 0 else None,
            "failure_rate": d["failure"] / requests if requests else None,
            "mean_latency_ms": d["request_duration_us"] / d["success"] / 1000 if d["success"] else None,
            "mean_queue_ms": d["queue_duration_us"] / d["success"] / 1000 if d["success"] else None,
            "mean_compute_ms": d["compute_infer_duration_us"] / d["executions"] / 1000 if d["executions"] else None,
            "mean_batch": d["inferences"] / d["executions"] if d["executions"] else None,
        }


def parse_triton_metrics(text: str) -> dict[tuple[str, str], TritonModelStats]:
    """Per (model, version) counters from Triton's Prometheus text (other metrics are ignored)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                field = _TRITON_COUNTERS.get(sample.name) or _TRITON_COUNTERS.get(sample.name.removesuffix("_total"))
                if field and "model" in sample.labels:  # summed over other labels (failure "reason")
                    key = (sample.labels["model"], sample.labels.get("version", ""))
                    fields = values.setdefault(key, {})
                    fields[field] = fields.get(field, 0.0) + float(sample.value)
    except ValueError as exc:
        raise RecopsError(
            f"triton metrics: not Prometheus text format ({exc}); pass the body of Triton's /metrics"
        ) from exc
    return {key: TritonModelStats(*key, **fields) for key, fields in values.items()}


def scrape_triton(
    url: str = "http://127.0.0.1:8002/metrics", timeout_s: float = 5.0
) -> dict[tuple[str, str], TritonModelStats]:
    """Fetch and parse Triton's metrics endpoint."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return parse_triton_metrics(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        raise RecopsError(
            f"triton metrics {url}: unreachable ({exc}); is the server running with metrics enabled?"
        ) from exc
