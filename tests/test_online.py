"""Online metrics from JSONL prediction/feedback logs (late, expired, missing feedback) and Triton's metrics."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recops.errors import RecopsError
from recops.ops.drift import detect_drift
from recops.ops.online import (
    LogFollower,
    OnlineConfig,
    TritonModelStats,
    log_feedback,
    log_predictions,
    online_metrics,
    parse_feedback,
    parse_triton_metrics,
    read_feedback,
    read_online,
    read_predictions,
    scrape_triton,
)
from recops.training.metrics import auc, logloss
from recops.training.spec import ColumnSpec
from recops.training.stats import load_reference, save_reference
from recops.training.synth import SynthConfig, generate, to_table

TRITON_TEXT = (Path(__file__).parent / "data" / "triton_metrics.txt").read_text()  # captured from a real tritonserver
CONFIG = OnlineConfig(window_s=60, max_delay_s=100)


def write_logs(tmp: Path, predictions: list[tuple], feedback: list[tuple]) -> tuple[Path, Path]:
    """predictions: (request_id, ts, version, prob); feedback: (request_id, ts, clicked)."""
    for rid, ts, version, prob in predictions:
        log_predictions(tmp / "pred.jsonl", [rid], [prob], version, ts=ts)
    for rid, ts, clicked in feedback:
        log_feedback(tmp / "fb.jsonl", [rid], [clicked], ts=ts)
    return tmp / "pred.jsonl", tmp / "fb.jsonl"


def test_late_expired_missing_orphan_and_duplicate_feedback_rules(tmp_path: Path) -> None:
    preds, fbs = write_logs(
        tmp_path,
        [
            ("a", 0, "1", 0.9),
            ("b", 10, "1", 0.2),
            ("c", 20, "1", 0.7),
            ("d", 30, "1", 0.1),
            ("e", 70, "1", 0.6),
            ("e", 75, "1", 0.1),  # duplicate request id: first kept
            ("f", 80, "2", 0.3),
        ],
        [
            ("a", 5, 1),  # in its window
            ("b", 65, 1),  # after the window [0, 60) closed, within 100 s: late, still a click of window 0
            ("c", 150, 1),  # 130 s after the prediction: expired -> c is missing feedback -> non-click
            ("zz", 50, 1),  # orphan
            ("e", 90, 0),
            ("e", 95, 1),  # any counted click wins
        ],
    )
    report = read_online(preds, fbs, CONFIG, now=175)
    assert (report.orphan_feedback, report.expired_feedback, report.duplicate_predictions) == (1, 1, 1)
    w0, w1_v1, w1_v2 = report.windows
    assert (w0.window_start, w0.window_end, w0.model_version) == (0, 60, "1")
    assert (w0.impressions, w0.feedback, w0.clicks, w0.late_feedback, w0.missing_feedback, w0.pending) == (
        4,
        2,
        2,
        1,
        2,
        0,
    )
    assert w0.complete and w0.ctr == 0.5 and w0.auc == auc([1, 1, 0, 0], [0.9, 0.2, 0.7, 0.1])
    assert w0.logloss == pytest.approx(logloss([1, 1, 0, 0], [0.9, 0.2, 0.7, 0.1]))
    assert w0.calibration == pytest.approx((0.9 + 0.2 + 0.7 + 0.1) / 4 / 0.5)
    assert (w1_v1.model_version, w1_v1.impressions, w1_v1.clicks, w1_v1.complete) == ("1", 1, 1, True)
    assert (w1_v2.model_version, w1_v2.pending, w1_v2.complete, w1_v2.ctr, w1_v2.auc) == ("2", 1, False, None, None)
    later = read_online(preds, fbs, CONFIG, now=180)  # f's max delay has passed: missing -> non-click
    assert later.windows[2].complete and later.windows[2].missing_feedback == 1 and later.windows[2].ctr == 0.0


def test_windowed_quality_matches_offline_metrics_on_synth_traffic(tmp_path: Path) -> None:
    """A served model (the world's true probability) with feedback delays up to 2 windows."""
    data = generate(SynthConfig(rows=6_000, seed=3))
    rng = np.random.default_rng(0)
    ts = np.sort(rng.uniform(0, 600, data.label.size))
    ids = [f"r{i}" for i in range(ts.size)]
    predictions = pd.DataFrame({"request_id": ids, "ts": ts, "model_version": "7", "prob": data.truth})
    feedback = pd.DataFrame({"request_id": ids, "ts": ts + rng.uniform(0, 90, ts.size), "clicked": data.label})
    report = online_metrics(predictions, feedback, CONFIG, now=10_000)
    assert len(report.windows) == 10 and all(w.complete and w.missing_feedback == 0 for w in report.windows)
    assert sum(w.late_feedback for w in report.windows) > 1000
    for w in report.windows:
        rows = (ts >= w.window_start) & (ts < w.window_end)
        assert w.impressions == rows.sum() and w.clicks == data.label[rows].sum()
        assert w.auc == pytest.approx(auc(data.label[rows], data.truth[rows]))


def test_torn_tail_is_not_read_and_concurrent_writers_do_not_interleave(tmp_path: Path) -> None:
    log = tmp_path / "fb.jsonl"
    log_feedback(log, ["a", "b"], [1, 0], ts=1.0)
    with open(log, "a") as fh:
        fh.write('{"request_id": "c", "ts": 2.0, "cli')  # a writer mid-line
    frame, torn = read_feedback(log)
    assert list(frame["request_id"]) == ["a", "b"] and torn > 0
    log.write_text(log.read_text().rsplit("\n", 1)[0] + "\n")

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(log, p)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    frame, torn = read_feedback(log)
    assert torn == 0 and len(frame) == 2 + 4 * 100 * 5 and frame["request_id"].is_unique


def _append_many(log: Path, worker: int) -> None:
    for i in range(100):
        log_feedback(log, [f"w{worker}-{i}-{j}" for j in range(5)], [1] * 5, ts=3.0)


def test_logged_features_round_trip_into_drift_detection(tmp_path: Path) -> None:
    spec = ColumnSpec.criteo()
    save_reference(tmp_path, to_table(generate(SynthConfig(rows=5_000, seed=0))).to_pandas(), spec)
    raw = to_table(generate(SynthConfig(rows=1_000, seed=1, covariate_drift=0.5))).to_pandas()
    log_predictions(
        tmp_path / "pred.jsonl", range(1_000), np.full(1_000, 0.25), "1", ts=5.0, features=raw.drop(columns="label")
    )
    logged, _ = read_predictions(tmp_path / "pred.jsonl", spec)
    reference = load_reference(tmp_path)
    assert logged[list(spec.dense)].equals(raw[list(spec.dense)].astype(np.float64))
    assert detect_drift(reference, logged).to_dict() == detect_drift(reference, raw).to_dict()
    assert set(detect_drift(reference, logged).drifted_features) >= {"I1", "I2", "C1", "C2", "C3"}


def test_log_follower_parses_only_new_lines_keeps_a_bounded_window_and_follows_rotation(tmp_path: Path) -> None:
    log, parsed = tmp_path / "fb.jsonl", []

    def parse(data: bytes, source: Path) -> pd.DataFrame:
        parsed.append(data.count(b"\n"))
        return parse_feedback(data, source)

    follower = LogFollower(log, parse, keep_s=100)
    assert follower.read().empty  # no log yet
    log_feedback(log, ["a", "b"], [1, 0], ts=0)
    assert follower.read()["request_id"].tolist() == ["a", "b"]
    log_feedback(log, ["c"], [1], ts=50)
    with open(log, "a") as fh:
        fh.write('{"request_id": "d", "ts": 60, ')  # a writer mid-line
    assert follower.read()["request_id"].tolist() == ["a", "b", "c"] and follower.torn_bytes > 0
    with open(log, "a") as fh:
        fh.write('"clicked": 0}\n')
    assert follower.read()["request_id"].tolist() == ["a", "b", "c", "d"] and follower.torn_bytes == 0
    assert parsed == [0, 2, 1, 1]  # each line parsed once, never the whole file again

    log_feedback(log, ["e"], [1], ts=120)  # a and b fall out of the 100 s window
    assert follower.read()["request_id"].tolist() == ["c", "d", "e"]

    log.rename(tmp_path / "fb.jsonl.1")  # logrotate: rename, then the writer creates a new file
    with open(tmp_path / "fb.jsonl.1", "a") as fh:
        fh.write('{"request_id": "f", "ts": 125, "clicked": 1}\n')  # written to the old file before the switch
    log_feedback(log, ["g"], [0], ts=130)
    assert follower.read()["request_id"].tolist() == ["c", "d", "e", "f", "g"]

    log.write_text("")  # copytruncate: truncated in place, then written again
    assert len(follower.read()) == 5
    log_feedback(log, ["h"], [1], ts=140)
    assert follower.read()["request_id"].tolist() == ["c", "d", "e", "f", "g", "h"]
    follower.close()


def test_bad_logs_raise(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"request_id": "a", "ts": 1.0}\n')
    with pytest.raises(RecopsError, match="lack"):
        read_feedback(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(RecopsError, match="not valid JSONL"):
        read_feedback(tmp_path / "bad.jsonl")
    assert read_feedback(tmp_path / "absent.jsonl")[0].empty
    with pytest.raises(RecopsError, match="window_s"):
        OnlineConfig(window_s=0)


def test_triton_metrics_parse_and_rates() -> None:
    stats = parse_triton_metrics(TRITON_TEXT)
    tiny = stats[("tiny", "1")]
    assert list(stats) == [("tiny", "1")]
    assert (tiny.success, tiny.failure, tiny.inferences, tiny.executions) == (9, 0, 23, 8)
    later_text = (
        TRITON_TEXT.replace('success{model="tiny",version="1"} 9', 'success{model="tiny",version="1"} 109')
        .replace('reason="BACKEND",version="1"} 0', 'reason="BACKEND",version="1"} 4')
        .replace('reason="OTHER",version="1"} 0', 'reason="OTHER",version="1"} 1')
        .replace('duration_us{model="tiny",version="1"} 321537', 'duration_us{model="tiny",version="1"} 521537')
    )
    later = parse_triton_metrics(later_text)[("tiny", "1")]
    rates = later.since(tiny, interval_s=10)
    assert later.failure == 5  # summed over the failure reasons
    assert (
        rates["requests"] == 105 and rates["requests_per_s"] == 10.5 and rates["failure_rate"] == pytest.approx(5 / 105)
    )
    assert rates["mean_latency_ms"] == pytest.approx(200_000 / 100 / 1000)
    restarted = TritonModelStats("tiny", "1", success=3, request_duration_us=3000).since(later, 10)
    assert restarted["requests"] == 3 and restarted["mean_latency_ms"] == 1.0
    with pytest.raises(RecopsError, match="unreachable"):
        scrape_triton("http://127.0.0.1:9/metrics", timeout_s=1)
