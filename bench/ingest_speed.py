"""Ingest speed and memory: `recops data ingest` (local, and on Ray with 1 and 2 workers) versus plain pandas.

Both read the same synthetic Criteo TSV (``recops.training.synth``: label, 13 dense, 26 categorical,
about 250 bytes a row), each run in its own process, imports done before the clock starts:

- ``pandas`` (the baseline): ``pd.read_csv`` of the whole file, ``fillna`` + ``log1p(max(x, 0))`` of the
  dense columns, ``pd.util.hash_array`` of each categorical into 100k buckets, ``np.save`` of the arrays;
- ``recops``: ``recops.training.dataset.ingest`` of the same file with the default configs: every row
  validated (rejects counted), keyed hashing into 100k buckets, train/val/test ``.npy`` files, the 200k-row
  reference sample and its statistics, the manifest. It streams 16 MiB blocks, parsing the next block
  in a second thread while the current one is processed.
- ``ray-1``, ``ray-2``: the same ingest with ``--engine ray --workers N`` on a local Ray of N CPUs: the file is
  cut into line-aligned 256 MiB ranges (``--range-mb``), each read, validated and transformed by a Ray task;
  this process (the driver) writes the arrays in order. ``seconds`` includes starting and stopping Ray
  (``startup_s``: the start, from the ingest's ``engine`` record).

``rows_per_s_steady`` is the rate between the first and the last chunk written (the ingest's progress calls):
without the Ray start and stop, the input hashing, the cutting of the file and the reference statistics.

``peak_rss_mib`` is the process's ``ru_maxrss`` (imports included; for Ray, the driver's); from the ingest's
``engine`` record, ``worker_peak_rss_mib`` is the largest ``ru_maxrss`` of the Ray workers (with the shared
object-store pages each wrote) and ``worker_peak_heap_mib`` the largest private memory (``RssAnon``) sampled at
each output (for local recops both are the process's).
``--rounds`` rounds alternate the tools (order reversed each round); each row is the median of the rounds,
``speedup_vs_pandas`` / ``vs_local`` the median of the per-round ratios of rows/s against pandas / local
recops, ``rss_vs_pandas`` that of peak RSS. CPU seconds (this process, all threads) are reported beside wall
seconds; the load average before each run is kept in ``details``: on a busy host compare the ratios, measured
side by side.

``python -m recops.bench.ingest_speed [--rows 2000000] [--rounds 3] [--range-mb 256] [--quick] [--results-dir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from recops.bench.common import bench_parser, format_table, run_json_subprocess, run_main, write_result
from recops.errors import RecopsError
from recops.training.engine import RANGE_BYTES, EngineConfig

NAME = "ingest_speed"
TOOLS = ("pandas", "recops", "ray-1", "ray-2")
BUCKETS = 100_000


def _parser():
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", default="2000000", help="rows of the synthetic file; a comma list runs several")
    parser.add_argument("--range-mb", type=float, default=None, help="Ray's range size (default: the engine's)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma list of %(default)s")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tool per size (median reported)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "recops-ingest-bench",
        help="where the generated files are cached and the runs write",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)  # one timed run (internal)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


def synth_file(work: Path, rows: int) -> Path:
    """The synthetic Criteo file of ``rows`` rows (cached: the generator is deterministic)."""
    from recops.training.synth import SynthConfig, write

    path = work / f"criteo-{rows}" / "data.tsv"
    if not path.is_file():
        write(SynthConfig(rows=rows, seed=0), path.parent)
    return path


def pandas_pipeline(path: Path, out: Path) -> int:
    """The baseline: read the whole file with pandas, fill, transform, hash, save; returns the row count."""
    import numpy as np
    import pandas as pd

    from recops.training.spec import ColumnSpec

    spec = ColumnSpec.criteo()
    frame = pd.read_csv(path, sep="\t", header=None, names=list(spec.columns))
    dense = np.log1p(np.maximum(frame[list(spec.dense)].fillna(0).to_numpy(np.float64), 0)).astype(np.float32)
    categorical = frame[list(spec.sparse)].fillna("")
    hashed = [pd.util.hash_array(categorical[c].to_numpy(object)) % np.uint64(BUCKETS - 1) for c in spec.sparse]
    sparse = np.stack(hashed, axis=1).astype(np.int64) + 1
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "dense.npy", dense)
    np.save(out / "sparse.npy", sparse)
    np.save(out / "label.npy", frame[spec.label].to_numpy(np.float32))
    return len(frame)


def recops_ingest(path: Path, out: Path, engine: EngineConfig) -> tuple[int, dict[str, Any]]:
    """``recops data ingest`` with its defaults into a fresh directory: the valid row count and what the run
    recorded (the engine's record, the steady rate)."""
    from recops.training.dataset import ingest

    written: list[tuple[float, int]] = []
    dataset = ingest([path], out, engine=engine, progress=lambda n: written.append((time.perf_counter(), n)))
    if dataset.rejected["total"]:
        raise RuntimeError(f"ingest rejected rows of a clean file: {dataset.rejected}")
    (first, before), (last, rows) = written[0], written[-1]
    steady = (rows - before) / (last - first) if last > first else None  # None: one chunk only
    return dataset.rows["total"], {**dataset.engine, "rows_per_s_steady": steady}


def worker(tool: str, path: Path, out: Path, range_mb: float | None) -> dict[str, Any]:
    """One timed run in this process; imports happen before the clock starts."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401

    import recops.training.dataset  # noqa: F401

    extra: dict[str, Any] = {}
    if tool == "pandas":
        run = lambda: (pandas_pipeline(path, out), {})  # noqa: E731
    else:
        workers = int(tool.split("-")[1]) if tool.startswith("ray-") else None
        ranges = None if range_mb is None else int(range_mb * (1 << 20))
        engine = EngineConfig("ray" if workers else "local", workers=workers, range_bytes=ranges)
        run = lambda: recops_ingest(path, out, engine)  # noqa: E731
    start, cpu = time.perf_counter(), time.process_time()
    rows, record = run()
    seconds = time.perf_counter() - start
    if record:
        extra.update(
            pieces=record["pieces"],
            worker_peak_rss_mib=max(record["worker_peak_rss_mib"]),
            worker_peak_heap_mib=max(record["worker_peak_heap_mib"]),
            worker_cpu_s=record["worker_cpu_s"],
            startup_s=record["startup_s"],
            rows_per_s_steady=record["rows_per_s_steady"],
        )
    return {
        "tool": tool,
        "rows": rows,
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def run_round(args, path: Path, order: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each tool once, in ``order``, each in a fresh process writing to a fresh directory."""
    results = {}
    for tool in order:
        out = args.work_dir / f"out-{tool}-{os.getpid()}"
        shutil.rmtree(out, ignore_errors=True)
        command = [__file__, "--worker", tool, "--input", str(path), "--out", str(out)]
        command += ["--range-mb", str(args.range_mb)] if args.range_mb else []
        load = os.getloadavg()[0]
        try:
            results[tool] = {**run_json_subprocess(command, args.timeout), "load_avg_1m": round(load, 2)}
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return results


def summarize(rows: int, rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per tool: medians over the rounds and the per-round ratios against pandas and local recops."""
    median = lambda tool, key: statistics.median(r[tool][key] for r in rounds)  # noqa: E731
    tools = [t for t in TOOLS if t in rounds[0]]
    out = []
    for tool in tools:
        row = {
            "tool": tool,
            "rows": rows,
            "rounds": len(rounds),
            "seconds": round(median(tool, "seconds"), 2),
            "cpu_s": round(median(tool, "cpu_s"), 2),
            "rows_per_s": round(median(tool, "rows_per_s")),
            "peak_rss_mib": round(median(tool, "peak_rss_mib")),
        }
        ratio = lambda key, base, tool=tool: _ratio(rounds, tool, base, key)  # noqa: E731
        if tool != "pandas" and "pandas" in tools:
            row.update(speedup_vs_pandas=ratio("rows_per_s", "pandas"), rss_vs_pandas=ratio("peak_rss_mib", "pandas"))
        if tool != "pandas":
            row.update(
                worker_peak_rss_mib=round(median(tool, "worker_peak_rss_mib")),
                worker_peak_heap_mib=round(median(tool, "worker_peak_heap_mib")),
                rows_per_s_steady=_steady(rounds, tool),
                rows_per_worker_cpu_s=round(
                    statistics.median(r[tool]["rows"] / r[tool]["worker_cpu_s"] for r in rounds)
                ),
                pieces=rounds[0][tool]["pieces"],
            )
        if tool.startswith("ray-"):
            row["startup_s"] = round(median(tool, "startup_s"), 1)
            if "recops" in tools:
                row["vs_local"] = ratio("rows_per_s", "recops")
                if row["rows_per_s_steady"] and next(x for x in out if x["tool"] == "recops")["rows_per_s_steady"]:
                    row["steady_vs_local"] = ratio("rows_per_s_steady", "recops")
        out.append(row)
    return out


def _steady(rounds: list[dict[str, dict[str, Any]]], tool: str) -> int | None:
    """The median steady rate over the rounds that have one."""
    rates = [r[tool]["rows_per_s_steady"] for r in rounds if r[tool]["rows_per_s_steady"]]
    return round(statistics.median(rates)) if rates else None


def _ratio(rounds: list[dict[str, dict[str, Any]]], tool: str, base: str, key: str) -> float:
    """The median over the rounds of ``tool``'s ``key`` over ``base``'s."""
    return round(statistics.median(r[tool][key] / r[base][key] for r in rounds), 2)


def plots(sizes: int) -> list[dict[str, Any]]:
    """Rates and memory per tool: against the row count when several sizes ran, else side by side."""
    by = {"x": "rows", "series": "tool"} if sizes > 1 else {"x": "tool"}
    return [
        {**by, "y": ["rows_per_s", "rows_per_s_steady"], "title": "ingest rows/s: end to end and steady"},
        {
            **by,
            "y": ["peak_rss_mib", "worker_peak_rss_mib", "worker_peak_heap_mib"],
            "title": "peak MiB: process (Ray: driver), per worker RSS and heap",
        },
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.input, args.out, args.range_mb)))
        return 0
    sizes = [20_000] if args.quick else sorted({int(r) for r in args.rows.split(",")})
    rounds = 1 if args.quick else args.rounds
    tools = tuple(t for t in TOOLS if t in args.tools.split(","))
    if not tools or set(args.tools.split(",")) - set(TOOLS):
        raise RecopsError(f"--tools {args.tools}: name some of {','.join(TOOLS)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    table, details = [], {}
    for size in sizes:
        print(f"{size} rows: generating/caching the file in {args.work_dir} ...", file=sys.stderr)
        path = synth_file(args.work_dir, size)
        measured = []
        for i in range(rounds):
            measured.append(run_round(args, path, tools if i % 2 == 0 else tools[::-1]))
            done = ", ".join(
                f"{t} {m['rows_per_s']:,.0f} rows/s, {m['peak_rss_mib']:.0f} MiB" for t, m in measured[-1].items()
            )
            print(f"{size} rows, round {i + 1}: {done}", file=sys.stderr)
        table += summarize(size, measured)
        details[str(size)] = {"file_bytes": path.stat().st_size, "rounds": measured}
    config = {
        "rows": sizes,
        "tools": tools,
        "rounds": rounds,
        "buckets": BUCKETS,
        "cores": len(os.sched_getaffinity(0)),
        "range_mb": args.range_mb or RANGE_BYTES >> 20,
    }
    out = write_result(
        NAME,
        table,
        args.results_dir,
        baseline="pandas" if "pandas" in tools else "recops",
        config=config,
        details=details,
        plots=plots(len(sizes)),
    )
    print(format_table(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main, NAME)
