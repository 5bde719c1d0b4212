"""GPU telemetry from NVML: one-shot readings, a background sampler, and Prometheus gauges.

Without a GPU or driver, NVML is unavailable: one log line says so ("no GPU: NVML unavailable
(reason)"), readings are empty with that reason, and nothing raises. A reading a device does not
support (power on some boards, utilisation under MIG) is None.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from recops.errors import RecopsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One device at one instant."""

    ts: float
    index: int
    name: str
    uuid: str
    utilization_pct: float | None
    memory_used_bytes: int
    memory_total_bytes: int
    power_w: float | None
    temperature_c: float | None


@dataclass(frozen=True)
class GpuReading:
    """All devices at one instant; ``reason`` says why ``gpus`` is empty when NVML is unavailable."""

    gpus: list[GpuSample]
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpus": [asdict(g) for g in self.gpus]}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@functools.lru_cache(maxsize=1)
def _nvml() -> tuple[Any, str | None]:
    """The initialised pynvml module, or None and why; the failure is logged once per process."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, None
    except Exception as exc:  # NVMLError subclasses, ImportError, OSError: all mean "no usable NVML"
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("no GPU: NVML unavailable (%s)", reason)
        return None, reason


def _optional(read: Callable[[], float], nvml: Any) -> float | None:
    try:
        return float(read())
    except nvml.NVMLError:
        return None


def _sample(nvml: Any, index: int, now: float) -> GpuSample:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    uuid = nvml.nvmlDeviceGetUUID(handle)
    return GpuSample(
        ts=now,
        index=index,
        name=name.decode() if isinstance(name, bytes) else str(name),
        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
        utilization_pct=_optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu, nvml),
        memory_used_bytes=int(memory.used),
        memory_total_bytes=int(memory.total),
        power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, nvml),
        temperature_c=_optional(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), nvml),
    )


def read_gpus() -> GpuReading:
    """Read every visible GPU once."""
    nvml, reason = _nvml()
    if nvml is None:
        return GpuReading([], reason)
    now = time.time()
    try:
        return GpuReading([_sample(nvml, i, now) for i in range(nvml.nvmlDeviceGetCount())])
    except nvml.NVMLError as exc:
        return GpuReading([], f"{type(exc).__name__}: {exc}")


@dataclass
class _Aggregate:
    """Running figures of one device (kept for the whole run, unlike the bounded sample buffer)."""

    name: str
    samples: int = 0
    util_sum: float = 0.0
    util_count: int = 0
    util_max: float = 0.0
    memory_peak_bytes: int = 0
    memory_total_bytes: int = 0
    power_sum: float = 0.0
    power_count: int = 0
    power_max_w: float = 0.0
    temperature_max_c: float | None = None

    def add(self, s: GpuSample) -> None:
        self.samples += 1
        self.memory_peak_bytes = max(self.memory_peak_bytes, s.memory_used_bytes)
        self.memory_total_bytes = s.memory_total_bytes
        if s.utilization_pct is not None:
            self.util_sum, self.util_count = self.util_sum + s.utilization_pct, self.util_count + 1
            self.util_max = max(self.util_max, s.utilization_pct)
        if s.power_w is not None:
            self.power_sum, self.power_count = self.power_sum + s.power_w, self.power_count + 1
            self.power_max_w = max(self.power_max_w, s.power_w)
        if s.temperature_c is not None:
            self.temperature_max_c = max(self.temperature_max_c or s.temperature_c, s.temperature_c)

    def to_dict(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "name": self.name,
            "samples": self.samples,
            "util_mean_pct": self.util_sum / self.util_count if self.util_count else None,
            "util_max_pct": self.util_max if self.util_count else None,
            "memory_peak_bytes": self.memory_peak_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "power_mean_w": self.power_sum / self.power_count if self.power_count else None,
            "power_max_w": self.power_max_w if self.power_count else None,
            "temperature_max_c": self.temperature_max_c,
        }


_GAUGES = {
    "utilization_pct": ("recops_gpu_utilization_percent", "GPU busy time percentage"),
    "memory_used_bytes": ("recops_gpu_memory_used_bytes", "GPU memory in use"),
    "memory_total_bytes": ("recops_gpu_memory_total_bytes", "GPU memory size"),
    "power_w": ("recops_gpu_power_watts", "GPU power draw"),
    "temperature_c": ("recops_gpu_temperature_celsius", "GPU core temperature"),
}


@dataclass(eq=False)
class GpuMonitor:
    """Samples every GPU every ``interval_s`` on a daemon thread.

    ``samples`` keeps the last ``max_samples`` readings (time series); ``summary()`` covers the whole
    run. Register the monitor with a Prometheus registry (``registry.register(monitor)``) to export
    the latest reading as ``recops_gpu_*`` gauges.
    """

    interval_s: float = 1.0
    max_samples: int = 100_000
    samples: collections.deque = field(init=False)
    latest: GpuReading = field(init=False, default_factory=lambda: GpuReading([]))
    _aggregates: dict[int, _Aggregate] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise RecopsError(f"gpu monitor: interval_s must be > 0, got {self.interval_s}")
        self.samples = collections.deque(maxlen=self.max_samples)

    def record(self, reading: GpuReading) -> None:
        """Add one reading (what the sampling thread calls)."""
        with self._lock:
            self.latest = reading
            self.samples.extend(reading.gpus)
            for s in reading.gpus:
                self._aggregates.setdefault(s.index, _Aggregate(s.name)).add(s)

    def _run(self) -> None:
        while True:
            self.record(read_gpus())
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> GpuMonitor:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="recops-gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict[str, Any]:
        """Whole-run figures: overall and per GPU (mean/max utilisation, peak memory, power, samples)."""
        with self._lock:
            gpus = [a.to_dict(i) for i, a in sorted(self._aggregates.items())]
            reason = self.latest.reason
        utils = [g["util_mean_pct"] for g in gpus if g["util_mean_pct"] is not None]
        return {
            "available": bool(gpus),
            "reason": reason,
            "samples": sum(g["samples"] for g in gpus),
            "util_mean_pct": sum(utils) / len(utils) if utils else None,
            "util_max_pct": max((g["util_max_pct"] for g in gpus if g["util_max_pct"] is not None), default=None),
            "memory_peak_bytes": max((g["memory_peak_bytes"] for g in gpus), default=0),
            "gpus": gpus,
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Prometheus collector protocol: the latest reading as gauges labelled by gpu index and name."""
        with self._lock:
            reading = self.latest
        yield GaugeMetricFamily(
            "recops_gpu_available", "1 if NVML reports at least one GPU", value=float(bool(reading.gpus))
        )
        for attr, (name, doc) in _GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["gpu", "name"])
            for s in reading.gpus:
                value = getattr(s, attr)
                if value is not None:
                    family.add_metric([str(s.index), s.name], float(value))
            yield family


@contextlib.contextmanager
def gpu_monitor(interval_s: float = 0.5) -> Iterator[GpuMonitor]:
    """``with gpu_monitor(0.5) as m: ...; m.summary()`` — sampling runs for the block's duration."""
    monitor = GpuMonitor(interval_s=interval_s)
    with monitor:
        yield monitor
