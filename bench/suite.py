"""Run the benchmark suite: every benchmark in ``BENCHMARKS`` in its own process, GPU utilisation
sampled meanwhile (``recops.ops.gpu.gpu_monitor``), then one report (``bench/report.py``).

``python -m recops.bench.suite [--quick] [--only NAME,...] [--results-dir DIR] [--extra NAME="ARGS"]``; the
same as ``recops bench``. A benchmark that is missing, fails or writes no JSON is recorded as such in
``suite.json`` and in the report, never skipped silently.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recops.bench.catalog import BENCHMARKS, Benchmark
from recops.bench.common import default_results_dir, hardware, portable
from recops.bench.report import render
from recops.errors import RecopsError
from recops.files import write_json_atomic

SUITE_FILE = "suite.json"
LOG_TAIL_CHARS = 3000


# Benchmarks run with passive OpenMP waiting: spinning worker threads collapse throughput ~10x on a busy host.
BENCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


@dataclass
class BenchRun:
    """What happened to one benchmark: ``status`` is ok, failed, missing, no_result or skipped."""

    name: str
    status: str
    detail: str = ""
    exit_code: int | None = None
    start_s: float = 0.0  # since the suite started
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    gpu: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""


def select(only: list[str] | None) -> list[Benchmark]:
    """The registered benchmarks named in ``only`` (all when empty)."""
    if not only:
        return list(BENCHMARKS)
    known = {b.name: b for b in BENCHMARKS}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise RecopsError(f"bench: unknown benchmark(s) {unknown}; choose from {sorted(known)}")
    return [known[n] for n in only]


def _monitor():
    """The NVML sampler, or None and why it is unavailable."""
    try:
        from recops.ops.gpu import gpu_monitor
    except ImportError as exc:
        return None, f"recops.ops.gpu unavailable: {exc}"
    return gpu_monitor(interval_s=0.5), None


def _series(samples, t0: float) -> list[dict[str, Any]]:
    return [
        {
            "t": round(s.ts - t0, 2),
            "gpu": s.index,
            "util_pct": s.utilization_pct,
            "memory_gib": round(s.memory_used_bytes / 2**30, 3),
        }
        for s in samples
    ]


def run_one(bench: Benchmark, results_dir: Path, quick: bool, extra: list[str], t0: float) -> tuple[BenchRun, list]:
    """Run one benchmark in a subprocess under the GPU monitor; returns its record and GPU samples."""
    cmd = [
        sys.executable,
        "-m",
        f"recops.bench.{bench.name}",
        "--results-dir",
        str(results_dir),
        *(("--quick", *bench.quick) if quick else bench.full),
        *extra,
    ]
    run = BenchRun(bench.name, "missing", command=portable(cmd[1:]), start_s=round(time.time() - t0, 2))
    if not bench.script.exists():
        run.detail = f"bench/{bench.name}.py does not exist"
        return run, []
    if bench.gpu_only and not hardware()["gpus"]:
        run.status, run.detail = "skipped", "needs a GPU; nvidia-smi lists none here"
        return run, []
    result_file = results_dir / f"{bench.name}.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    monitor, reason = _monitor()
    start = time.time()
    if monitor is None:
        proc = _run(cmd, bench.timeout_s)
        samples, run.gpu = [], {"available": False, "reason": reason}
    else:
        with monitor as m:
            proc = _run(cmd, bench.timeout_s)
        samples, run.gpu = _series(m.samples, t0), m.summary()
    run.seconds = round(time.time() - start, 2)
    run.exit_code, run.log_tail = proc.returncode, portable(proc.stdout)[-LOG_TAIL_CHARS:]
    fresh = result_file.exists() and result_file.stat().st_mtime != before
    if proc.returncode != 0:
        run.status, run.detail = "failed", f"exit {proc.returncode}" + ("" if fresh else ", no result JSON")
    elif not fresh:
        run.status, run.detail = "no_result", f"exit 0 but {result_file.name} was not written"
    else:
        run.status = "ok"
    return run, samples


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (its workers too)."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**BENCH_ENV, **os.environ},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return subprocess.CompletedProcess(cmd, 124, out + f"\n[suite] killed after {timeout_s:.0f} s", "")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_suite(
    benchmarks: list[Benchmark],
    results_dir: Path | None = None,
    quick: bool = False,
    extra: dict[str, list[str]] | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Run ``benchmarks``, write ``suite.json`` and the report; returns the suite record."""
    results_dir = Path(results_dir or default_results_dir())
    results_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs, series = [], []
    for bench in benchmarks:
        if echo:
            print(f"[suite] {bench.name} ...", file=sys.stderr, flush=True)
        run, samples = run_one(bench, results_dir, quick, (extra or {}).get(bench.name, []), t0)
        runs.append(run)
        series += [{**s, "benchmark": bench.name} for s in samples]
        if echo:
            print(f"[suite] {bench.name}: {run.status} {run.detail} ({run.seconds:.0f} s)", file=sys.stderr, flush=True)
    suite = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "quick": quick,
        "runs": [asdict(r) for r in runs],
        "gpu_series": series,
    }
    write_json_atomic(results_dir / SUITE_FILE, portable(suite))
    suite["report"] = {k: str(v) for k, v in render(results_dir).items()}
    return suite


def parse_extra(items: list[str]) -> dict[str, list[str]]:
    """``["train_throughput=--device cuda --rounds 1"]`` -> ``{"train_throughput": ["--device", ...]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, args = item.partition("=")
        if not sep or not name:
            raise RecopsError(f'bench: --extra {item!r} must look like NAME="ARGS"')
        out.setdefault(name, []).extend(shlex.split(args))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="minimal sizes (a smoke run, about a minute)")
    parser.add_argument(
        "--only",
        type=lambda s: [n for n in s.split(",") if n],
        default=None,
        help=f"comma-separated subset of: {', '.join(b.name for b in BENCHMARKS)}",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="JSON results, PNG plots and the report (default: $RECOPS_BENCH_RESULTS or runs/bench)",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help='extra arguments for one benchmark, e.g. train_throughput="--device cuda"',
    )
    parser.add_argument("--report-only", action="store_true", help="re-render the report from existing JSON")


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Shared by ``python -m recops.bench.suite`` and ``recops bench``: a summary dict; raises if any benchmark
    failed."""
    if args.report_only:
        return {"report": {k: str(v) for k, v in render(args.results_dir).items()}}
    suite = run_suite(select(args.only), args.results_dir, args.quick, parse_extra(args.extra))
    summary = {
        "results_dir": str(args.results_dir or default_results_dir()),
        "report": suite["report"].get("markdown"),
        "benchmarks": {r["name"]: r["status"] + (f" ({r['detail']})" if r["detail"] else "") for r in suite["runs"]},
    }
    bad = [r["name"] for r in suite["runs"] if r["status"] not in ("ok", "skipped")]
    if bad:
        raise RecopsError(
            f"{len(bad)} of {len(suite['runs'])} benchmarks did not complete ({', '.join(bad)}); "
            f"see {summary['report']}"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        summary = run_from_args(parser.parse_args(argv))
    except RecopsError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
