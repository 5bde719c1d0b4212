"""NVML telemetry: real readings on a GPU host, a clear empty result (never a crash) without one."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from recops.cli import main as cli
from recops.errors import RecopsError
from recops.ops import gpu
from recops.ops.gpu import GpuMonitor, GpuReading, GpuSample, gpu_monitor, read_gpus

HAS_GPU = bool(read_gpus().gpus)


def sample(index: int, util: float | None, used: int, power: float | None, ts: float = 0.0) -> GpuSample:
    return GpuSample(ts, index, f"gpu{index}", f"GPU-{index}", util, used, 80 << 30, power, 50.0 + index)


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "recops-gpu-monitor"]


@pytest.mark.skipif(HAS_GPU, reason="this host has a GPU")
def test_without_nvml_readings_are_empty_and_logged_once(caplog) -> None:
    gpu._nvml.cache_clear()
    with caplog.at_level(logging.WARNING, logger="recops.ops.gpu"):
        first, second = read_gpus(), read_gpus()
    assert first.gpus == [] and first.reason and first == second
    assert [r.getMessage() for r in caplog.records] == [f"no GPU: NVML unavailable ({first.reason})"]
    with gpu_monitor(interval_s=0.05) as monitor:
        time.sleep(0.2)
    summary = monitor.summary()
    assert summary["available"] is False and summary["samples"] == 0 and summary["reason"] == first.reason
    assert list(monitor.samples) == [] and monitor_threads() == []


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and driver")
def test_real_gpu_readings_and_sampling() -> None:
    reading = read_gpus()
    assert reading.reason is None and all(
        g.memory_total_bytes > 0 and 0 <= g.memory_used_bytes <= g.memory_total_bytes for g in reading.gpus
    )
    with gpu_monitor(interval_s=0.05) as monitor:
        time.sleep(0.5)
    summary = monitor.summary()
    assert summary["available"] and summary["samples"] >= 2 * len(reading.gpus)
    assert summary["memory_peak_bytes"] > 0 and len(summary["gpus"]) == len(reading.gpus)


def test_summary_aggregates_every_reading_and_buffer_is_bounded() -> None:
    monitor = GpuMonitor(interval_s=1.0, max_samples=3)
    monitor.record(GpuReading([sample(0, 10.0, 1 << 30, 100.0), sample(1, None, 5 << 30, None)]))
    monitor.record(GpuReading([sample(0, 30.0, 3 << 30, 300.0, ts=1), sample(1, 50.0, 2 << 30, None, ts=1)]))
    summary = monitor.summary()
    assert len(monitor.samples) == 3  # bounded time series; the summary still covers all 4 samples
    assert summary["samples"] == 4 and summary["memory_peak_bytes"] == 5 << 30
    gpu0, gpu1 = summary["gpus"]
    assert (gpu0["util_mean_pct"], gpu0["util_max_pct"], gpu0["power_mean_w"], gpu0["power_max_w"]) == (
        20.0,
        30.0,
        200.0,
        300.0,
    )
    assert (gpu1["util_mean_pct"], gpu1["power_mean_w"], gpu1["memory_peak_bytes"]) == (50.0, None, 5 << 30)
    assert summary["util_mean_pct"] == 35.0 and summary["util_max_pct"] == 50.0
    with pytest.raises(RecopsError, match="interval_s"):
        GpuMonitor(interval_s=0)


def test_prometheus_gauges_follow_the_latest_reading() -> None:
    registry, monitor = CollectorRegistry(), GpuMonitor()
    registry.register(monitor)
    assert "recops_gpu_available 0.0" in generate_latest(registry).decode()
    monitor.record(GpuReading([sample(0, 42.0, 7 << 30, None)]))
    text = generate_latest(registry).decode()
    assert "recops_gpu_available 1.0" in text
    assert 'recops_gpu_utilization_percent{gpu="0",name="gpu0"} 42.0' in text
    assert 'recops_gpu_memory_used_bytes{gpu="0",name="gpu0"} 7.516192768e+09' in text
    assert "recops_gpu_power_watts{" not in text  # unsupported reading: no sample, not a fake zero


def test_gpu_cli(capsys) -> None:
    assert cli(["gpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["gpus"] if HAS_GPU else (result["gpus"] == [] and "NVML" in result["reason"])
    assert cli(["gpu", "--interval", "0", "--json"]) == 2
