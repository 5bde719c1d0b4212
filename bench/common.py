"""Shared helpers for benchmark scripts: arguments, timing, peak memory, result JSON, tables.

A benchmark script ``bench/<name>.py`` defines ``main(argv: list[str] | None = None) -> int`` and:

1. builds its parser with ``parser = bench_parser(__doc__)`` (adds ``--quick``, ``--results-dir``,
   ``--threads``) and calls ``pin_threads(args.threads)`` before timing anything;
2. times with ``measure(fn, warmup=..., repeats=...)`` (warm-up excluded, median reported);
3. writes ``write_result(name, rows, args.results_dir, baseline=..., plots=[...], config=...)``, which
   adds the benchmark name, the date and the hardware label, and prints ``format_table(rows)``.

``rows`` is a list of flat dicts (one per measured point). ``plots`` tells ``bench/report.py`` what to
draw: ``{"x": "batch_size", "y": "samples_per_s", "series": "variant", "title": "...", "log_x": True}``;
``"y"`` may be a list of columns (e.g. latency percentiles); when ``baseline`` is set the report
also draws each series as a ratio against the row of the baseline series at the same x. Lines suit a numeric x;
for categories (scenarios, variants, models) add ``"kind": "bar"``: one group of bars per x value (``"x"`` may be
a list of columns, joined into one label), a bar per series and y, values written on the bars; ``"log_y"`` puts a
400x gap and a 1x one on the same figure. A figure a script draws itself goes to ``<results-dir>/<name>.png``:
the report shows it after the plots it draws.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from recops.errors import RecopsError
from recops.files import write_json_atomic
from recops.settings import settings
from recops.training.environment import cpu_model

BENCH_DIR = Path(__file__).resolve().parent  # the benchmark scripts


def portable(value: Any) -> Any:
    """``value`` (a string, or lists and dicts of them) without this machine's absolute paths: the working
    directory's and the repository's prefixes dropped, the Python environment shown as ``<venv>``, the temporary
    directory as ``<tmp>``, the home directory as ``~``. Committed results carry no local paths."""
    if isinstance(value, str):
        for prefix, short in _local_prefixes():
            value = value.replace(prefix, short)
        return value
    if isinstance(value, dict):
        return {portable(k): portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


@lru_cache(maxsize=1)
def _local_prefixes() -> tuple[tuple[str, str], ...]:
    pairs = {
        f"{Path(sys.prefix).resolve()}/": "<venv>/",
        f"{Path.cwd()}/": "",
        f"{BENCH_DIR.parent}/": "",
        f"{Path(tempfile.gettempdir()).resolve()}/": "<tmp>/",
        f"{Path.home()}/": "~/",
    }
    return tuple(sorted(((p, s) for p, s in pairs.items() if p != "//"), key=lambda item: -len(item[0])))


def default_results_dir() -> Path:
    """Where results go by default: ``recops.settings`` bench_results ($RECOPS_BENCH_RESULTS, runs/bench).
    `make bench` passes ``--results-dir bench/results``, the committed figures."""
    return settings().bench_results


def bench_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark accepts."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0] if description else None)
    parser.add_argument("--quick", action="store_true", help="minimal sizes (smoke test, seconds)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the JSON result goes (default: $RECOPS_BENCH_RESULTS or runs/bench)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores this process may use)")
    return parser


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pin_threads(threads: int = 0) -> int:
    """Fix torch's intra-op threads (0 = all usable cores) and flush denormals; returns the count."""
    import torch

    n = threads or cores()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return n


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed repeat (warm-up excluded)."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def measure(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, sync: Callable[[], None] | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then time ``repeats`` calls (``sync`` runs before each clock
    read, e.g. ``torch.cuda.synchronize``)."""
    if repeats < 1:
        raise RecopsError(f"measure: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpus() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


@lru_cache(maxsize=1)
def hardware() -> dict[str, Any]:
    """What the numbers were measured on, with a one-line ``label`` for tables and plots."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = _gpus()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores(),
        "memory_gib": round(mem_gib, 1),
        "gpus": gpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    gpu = f"{len(gpus)}x {gpus[0].split(',')[0]}" if gpus else "no GPU"
    info["label"] = f"{info['cpu']}, {info['cores']} cores, {mem_gib:.0f} GiB, {gpu}"
    return info


def write_result(
    name: str,
    rows: list[dict[str, Any]],
    results_dir: Path | None = None,
    *,
    baseline: str | None = None,
    plots: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Write ``<results_dir>/<name>.json`` with the rows, the hardware label, the date and the 1-minute load
    average (a busy host slows everything: compare ratios measured in the same run); returns the path. Local
    absolute paths in the data are made relative (:func:`portable`)."""
    data = {
        "benchmark": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "baseline": baseline,
        "config": config or {},
        "rows": rows,
        "plots": plots or [],
        **extra,
    }
    return write_json_atomic(Path(results_dir or default_results_dir()) / f"{name}.json", portable(data))


def read_result(name: str, results_dir: Path | None = None) -> dict[str, Any]:
    path = Path(results_dir or default_results_dir()) / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecopsError(f"benchmark result {path}: unreadable ({exc}); run `recops bench --only {name}`") from exc


def format_cell(value: Any) -> str:
    """A table cell: thousands separators for big floats, 4 significant digits for small ones (AUCs differ in
    the third decimal)."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (columns: the given ones, else every key in first-seen order)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def run_json_subprocess(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <args>`` and return the JSON object on its last stdout line."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:
        raise RecopsError(f"{' '.join(args)}: still running after {timeout_s:.0f} s; use smaller sizes") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise RecopsError(f"{' '.join(args)}: exit {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def run_main(main: Callable[[], int], name: str) -> None:
    """Exit with ``main()``'s status; a RecopsError becomes a one-line error and exit 2."""
    try:
        sys.exit(main())
    except RecopsError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
