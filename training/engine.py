"""Where the heavy data work runs: in this process (``local``) or as Ray tasks (``ray``), with the same code.

A job is a generator function run once per piece of the inputs (read, validate, transform the rows of one file or
of one line-aligned byte range of it). :meth:`Engine.map` runs it over the pieces and hands every output to the
caller in piece order, so what the caller writes does not depend on the engine or on how the pieces ran.

``ray`` attaches to ``address`` or starts a local Ray sized to ``workers`` CPUs (default: the machine's). Each
piece is a Ray generator task of one CPU whose outputs stream through the object store; ``2 * workers`` pieces
are in flight, and a piece ahead of the one being consumed pauses after a range's worth of outputs, so memory is
bounded by the reader's block size whatever the file size (a whole gzip file is one piece). Every task also
reports its worker's peak RSS (``ru_maxrss``: with the object-store pages it wrote, which are shared memory), its
peak heap (``RssAnon`` at each output: the process's private memory) and the CPU seconds the task took.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from recops.errors import RecopsError
from recops.training.ray_runtime import ray_session

ENGINES = ("local", "ray")
RANGE_BYTES = 256 << 20  # ray: plain text files are read in line-aligned ranges of about this size
BLOCK_BYTES = 16 << 20  # the reader's block: what one output holds and what memory per worker scales with


@dataclass(frozen=True)
class EngineConfig:
    """The engine of `recops data ingest` and `recops score` (``--engine``, ``--address``, ``--workers``).

    ``range_bytes``: plain text files larger than this are cut into line-aligned ranges of about this size, one
    piece each (default: ``RANGE_BYTES`` with ray, whole files locally).
    """

    name: str = "local"
    address: str | None = None
    workers: int | None = None
    range_bytes: int | None = None
    block_bytes: int = BLOCK_BYTES

    def __post_init__(self) -> None:
        from recops.training.textfile import SNIFF_BYTES  # (numpy, pyarrow: not when the CLI builds its parser)

        if self.name not in ENGINES:
            raise RecopsError(f"--engine {self.name!r}: use one of {ENGINES}")
        if self.name == "local" and (self.address or self.workers):
            raise RecopsError("--address and --workers run the work on Ray: add --engine ray")
        if self.workers is not None and self.workers < 1:
            raise RecopsError(f"--workers {self.workers}: pass 1 or more")
        if self.range_bytes is not None and self.range_bytes < SNIFF_BYTES:
            raise RecopsError(f"range size {self.range_bytes} bytes: pass at least {SNIFF_BYTES} (64 KiB)")

    @property
    def ranges(self) -> int | None:
        """The range size files are cut at, or None (whole files)."""
        return self.range_bytes or (RANGE_BYTES if self.name == "ray" else None)


@dataclass(frozen=True)
class _Report:
    """The last output of every Ray task: its worker's pid, peak RSS and peak heap, and the task's CPU seconds."""

    pid: int
    rss_mib: float
    heap_mib: float
    cpu_s: float


def _heap_mib() -> float:
    """This process's private resident memory now (Linux ``RssAnon``; 0 where unknown)."""
    try:
        with open("/proc/self/status") as fh:
            line = next((line for line in fh if line.startswith("RssAnon:")), "RssAnon: 0 kB")
    except OSError:
        return 0.0
    return int(line.split()[1]) / 1024


def _measured(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, then a :class:`_Report` of this process (the heap sampled at each item)."""
    heap, cpu = 0.0, time.process_time()
    for item in items:
        heap = max(heap, _heap_mib())
        yield item
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    yield _Report(os.getpid(), peak, max(heap, _heap_mib()), time.process_time() - cpu)


def _run(job: Callable[..., Iterator[Any]], *args: Any) -> Iterator[Any]:
    """A job in a Ray worker, followed by the worker's report."""
    yield from _measured(job(*args))


class Engine:
    """Runs jobs over pieces in order (a context manager: ``ray`` holds its Ray session inside the block)."""

    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.workers = 1
        self.peaks: dict[int, tuple[float, float]] = {}  # worker pid -> peak (RSS, heap) in MiB (local: this process)
        self.cpu_s = 0.0  # the tasks' CPU seconds (local: this process's, the caller's work included)
        self.startup_s = 0.0  # starting (or attaching to) Ray
        self._session: contextlib.ExitStack | None = None

    def __enter__(self) -> Engine:
        if self.config.name == "ray":
            start = time.perf_counter()
            with contextlib.ExitStack() as stack:
                stack.enter_context(ray_session(self.config.address, self.config.workers))
                self.workers = _capacity(self.config)
                self._session = stack.pop_all()
            self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def describe(self) -> dict[str, Any]:
        """What the manifest and the score summary record of the run."""
        return {
            "name": self.config.name,
            "workers": self.workers,
            "worker_peak_rss_mib": sorted(round(rss) for rss, _ in self.peaks.values()),
            "worker_peak_heap_mib": sorted(round(heap) for _, heap in self.peaks.values()),
            "worker_cpu_s": round(self.cpu_s, 2),
            "startup_s": round(self.startup_s, 2),
        }

    def map(self, job: Callable[..., Iterator[Any]], calls: Iterable[tuple]) -> Iterator[Any]:
        """``job(*args)``'s outputs for every ``args`` of ``calls``, in order. ``calls`` is read lazily, as pieces
        start: arguments made from the caller's state (e.g. a sample threshold) are current when a piece starts."""
        if self.config.name == "ray":
            items = self._ray_map(job, iter(calls))
        else:
            items = _measured(item for args in calls for item in job(*args))
        for item in items:
            if isinstance(item, _Report):
                rss, heap = self.peaks.get(item.pid, (0.0, 0.0))
                self.peaks[item.pid] = (max(rss, item.rss_mib), max(heap, item.heap_mib))
                self.cpu_s += item.cpu_s
            else:
                yield item

    def _ray_map(self, job: Callable[..., Iterator[Any]], calls: Iterator[tuple]) -> Iterator[Any]:
        import ray

        ranges = self.config.ranges or RANGE_BYTES
        ahead = math.ceil(ranges / self.config.block_bytes) + 2  # a range's outputs: ranges never pause
        task = ray.remote(_run).options(num_cpus=1, _generator_backpressure_num_objects=ahead)
        running: deque = deque()
        try:
            while True:
                while len(running) < 2 * self.workers and (args := next(calls, None)) is not None:
                    running.append(task.remote(job, *args))
                if not running:
                    return
                for ref in running.popleft():
                    yield _get(ref)
        finally:
            for pending in running:
                ray.cancel(pending)


def _get(ref: Any) -> Any:
    """One output; a RecopsError raised in a task is raised here as itself."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, RecopsError):
            raise exc.cause from None
        raise


def _capacity(config: EngineConfig) -> int:
    """The number of workers: ``config.workers``, at most the cluster's CPUs (queued pieces could wait behind
    paused ones), by default all of them."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    where = f"the Ray cluster at {config.address}" if config.address else "the local Ray"
    if cpus < (config.workers or 1):
        raise RecopsError(f"--workers {config.workers or 1}: {where} has {cpus} CPUs; pass --workers {max(cpus, 1)}")
    return config.workers or cpus
