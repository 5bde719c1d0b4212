"""Ingest speed and memory: `recops data ingest` versus a plain pandas pipeline doing the core work.

Both read the same synthetic Criteo TSV (``recops.training.synth``: label, 13 dense, 26 categorical,
about 250 bytes a row), each run in its own process, imports done before the clock starts:

- ``pandas`` (the baseline): ``pd.read_csv`` of the whole file, ``fillna`` + ``log1p(max(x, 0))`` of the
  dense columns, ``pd.util.hash_array`` of each categorical into 100k buckets, ``np.save`` of the arrays;
- ``recops``: ``recops.training.dataset.ingest`` of the same file with the default configs: every row
  validated (rejects counted), keyed hashing into 100k buckets, train/val/test ``.npy`` files, the 200k-row
  reference sample and its statistics, the manifest. It streams 16 MiB blocks, parsing the next block
  in a second thread while the current one is processed.

``peak_rss_mib`` is the process's ``ru_maxrss`` (imports included). ``--rounds`` rounds alternate the two
tools (order swapped each round); each row is the median of the rounds, ``speedup_vs_pandas`` the median
of the per-round ratios of rows/s and ``rss_vs_pandas`` that of peak RSS. Several ``--rows`` sizes show
whether peak memory grows with the file. CPU seconds (all threads) are reported beside wall seconds: on a
busy host compare the ratios, measured side by side.

``python -m recops.bench.ingest_speed [--rows 1000000,3000000] [--rounds 3] [--quick] [--results-dir DIR]``
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

NAME = "ingest_speed"
TOOLS = ("pandas", "recops")
BUCKETS = 100_000


def _parser():
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--rows", default="1000000,3000000", help="rows of the synthetic file; a comma list runs several"
    )
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


def recops_ingest(path: Path, out: Path) -> int:
    """``recops data ingest`` with its defaults into a fresh directory; returns the valid row count."""
    from recops.training.dataset import ingest

    dataset = ingest([path], out)
    if dataset.manifest["rejected"]["total"]:
        raise RuntimeError(f"ingest rejected rows of a clean file: {dataset.manifest['rejected']}")
    return dataset.manifest["rows"]["total"]


def worker(tool: str, path: Path, out: Path) -> dict[str, Any]:
    """One timed run in this process; imports happen before the clock starts."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401

    import recops.training.dataset  # noqa: F401

    run = pandas_pipeline if tool == "pandas" else recops_ingest
    start, cpu = time.perf_counter(), time.process_time()
    rows = run(path, out)
    seconds = time.perf_counter() - start
    return {
        "tool": tool,
        "rows": rows,
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_round(args, path: Path, order: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each tool once, in ``order``, each in a fresh process writing to a fresh directory."""
    results = {}
    for tool in order:
        out = args.work_dir / f"out-{tool}-{os.getpid()}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            results[tool] = run_json_subprocess(
                [__file__, "--worker", tool, "--input", str(path), "--out", str(out)], args.timeout
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return results


def summarize(rows: int, rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per tool: medians over the rounds and the per-round ratios against pandas."""
    median = lambda tool, key: statistics.median(r[tool][key] for r in rounds)  # noqa: E731
    out = []
    for tool in TOOLS:
        row = {
            "tool": tool,
            "rows": rows,
            "rounds": len(rounds),
            "seconds": round(median(tool, "seconds"), 2),
            "cpu_s": round(median(tool, "cpu_s"), 2),
            "rows_per_s": round(median(tool, "rows_per_s")),
            "peak_rss_mib": round(median(tool, "peak_rss_mib")),
        }
        if tool != "pandas":
            row["speedup_vs_pandas"] = round(
                statistics.median(r[tool]["rows_per_s"] / r["pandas"]["rows_per_s"] for r in rounds), 2
            )
            row["rss_vs_pandas"] = round(
                statistics.median(r[tool]["peak_rss_mib"] / r["pandas"]["peak_rss_mib"] for r in rounds), 2
            )
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.input, args.out)))
        return 0
    sizes = [20_000] if args.quick else sorted({int(r) for r in args.rows.split(",")})
    rounds = 1 if args.quick else args.rounds
    args.work_dir.mkdir(parents=True, exist_ok=True)
    table, details = [], {}
    for size in sizes:
        print(f"{size} rows: generating/caching the file in {args.work_dir} ...", file=sys.stderr)
        path = synth_file(args.work_dir, size)
        measured = []
        for i in range(rounds):
            measured.append(run_round(args, path, TOOLS if i % 2 == 0 else TOOLS[::-1]))
            done = ", ".join(
                f"{t} {m['rows_per_s']:,.0f} rows/s, {m['peak_rss_mib']:.0f} MiB" for t, m in measured[-1].items()
            )
            print(f"{size} rows, round {i + 1}: {done}", file=sys.stderr)
        table += summarize(size, measured)
        details[str(size)] = {"file_bytes": path.stat().st_size, "rounds": measured}
    config = {"rows": sizes, "rounds": rounds, "buckets": BUCKETS, "cores": len(os.sched_getaffinity(0))}
    out = write_result(
        NAME,
        table,
        args.results_dir,
        baseline="pandas",
        config=config,
        details=details,
        plots=[
            {"x": "rows", "y": "rows_per_s", "series": "tool", "title": "ingest rows/s"},
            {"x": "rows", "y": "peak_rss_mib", "series": "tool", "title": "ingest peak RSS (MiB)"},
        ],
    )
    print(format_table(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main, NAME)
