"""Subprocess workers of ``bench/drift_speed.py``: one drift report (or reference build) per process.

Top-level imports are stdlib only: the ``evidently`` worker runs under the separate Evidently venv,
which has neither recops' dependencies nor its pins. Each worker prints one JSON line with its
timings and its own peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> dict[str, float | None]:
    """Memory now (the loaded data), then reset the kernel's peak so VmHWM measures the report alone."""
    resident, load_peak = _status_mib("VmRSS"), _peak_rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return {"data_rss_mib": resident, "load_peak_rss_mib": load_peak}


def _memory(before: dict[str, float | None]) -> dict[str, float | None]:
    """Resident data, the peak during the report, and the whole process's peak (load included)."""
    report_peak = _status_mib("VmHWM")
    return {
        "data_rss_mib": before["data_rss_mib"],
        "report_peak_rss_mib": report_peak,
        "peak_rss_mib": max(before["load_peak_rss_mib"], report_peak or 0.0, _peak_rss_mib()),
    }


def _read(path: str, categorical: list[str], strings: str = "object"):
    """A Parquet pair file as pandas; ``object``: categoricals as Python str objects (what recops'
    readers yield), ``native``: as the installed pandas reads them (Arrow-backed strings in pandas 3)."""
    import pandas as pd

    frame = pd.read_parquet(path)
    if strings == "native":
        return frame
    return frame.assign(**{c: frame[c].astype(object).where(frame[c].notna(), None) for c in categorical})


def build(args: argparse.Namespace) -> dict[str, Any]:
    """recops: reference statistics of the reference file (ingest time, once per dataset)."""
    from pathlib import Path

    from recops.training.spec import ColumnSpec
    from recops.training.stats import save_reference

    spec = ColumnSpec(dense=tuple(args.dense.split(",")), sparse=tuple(args.categorical.split(",")))
    frame = _read(args.reference, list(spec.sparse))
    start, start_cpu = time.perf_counter(), time.process_time()
    save_reference(Path(args.out), frame, spec)
    return {
        "build_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - start_cpu,
        "peak_rss_mib": _peak_rss_mib(),
    }


def recops(args: argparse.Namespace) -> dict[str, Any]:
    """recops: load the stored reference and run the drift report on the current file."""
    from recops.ops.drift import detect_drift
    from recops.training.stats import load_reference

    current = _read(args.current, args.categorical.split(","), args.strings)
    memory = _reset_peak()
    times, cpu, report = [], [], None
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        report = detect_drift(load_reference(args.out), current)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "report_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "times_s": times,
        **_memory(memory),
        "flagged": report.drifted_features,
        "features": {
            name: {k: v for k, v in row.items() if k != "tests"} for name, row in report.to_dict()["features"].items()
        },
    }


def evidently(args: argparse.Namespace) -> dict[str, Any]:
    """Evidently: ``Report([DataDriftPreset()])`` over the full reference and current frames."""
    import evidently as ev
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    dense, categorical = args.dense.split(","), args.categorical.split(",")
    reference, current = (_read(p, categorical)[dense + categorical] for p in (args.reference, args.current))
    definition = DataDefinition(numerical_columns=dense, categorical_columns=categorical)
    memory = _reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    result = snapshot.dict()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    features, flagged = {}, []
    for metric in result["metrics"]:
        config = metric["config"]
        if not config.get("type", "").endswith("ValueDrift"):
            continue
        method, value, threshold = config["method"], float(metric["value"]), float(config["threshold"])
        drifted = value < threshold if "p_value" in method else value >= threshold
        features[config["column"]] = {"test": method, "value": value, "threshold": threshold, "drifted": drifted}
        flagged += [config["column"]] if drifted else []
    order = dense + categorical
    return {
        "report_s": elapsed,
        "cpu_s": cpu,
        "times_s": [elapsed],
        **_memory(memory),
        "version": ev.__version__,
        "flagged": sorted(flagged, key=order.index),
        "features": features,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("worker", choices=("build", "recops", "evidently"))
    parser.add_argument("--reference", help="reference Parquet file")
    parser.add_argument("--current", help="current Parquet file")
    parser.add_argument("--out", help="recops reference directory")
    parser.add_argument("--dense", required=True, help="comma-separated numeric columns")
    parser.add_argument("--categorical", required=True, help="comma-separated categorical columns")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--strings", choices=("object", "native"), default="object", help="recops: in-memory string type"
    )
    args = parser.parse_args(argv)
    result = {"build": build, "recops": recops, "evidently": evidently}[args.worker](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
