"""Drift report speed and verdicts: recops (ops.drift) vs Evidently's DataDriftPreset, side by side.

Pairs built with the synth generator (13 numeric + 26 categorical Criteo-like columns, cardinalities
8..100k, Zipf), reference and current ``--rows`` rows each:

- ``no_drift``: a fresh sample of the same world (nothing should be flagged);
- ``partial_drift``: covariate drift 0.2 on I1, I2, C1, C2, C3;
- ``strong_drift``: covariate drift 0.8 on 15 features, including the 30k- and 100k-value C18/C20.

Every report runs in its own process. Memory: ``data_rss_mib`` resident once the frames are loaded,
``report_peak_rss_mib`` the peak during the report (kernel peak reset after loading),
``peak_rss_mib`` the process's whole peak (``ru_maxrss``, loading included). Wall and CPU seconds are
both reported (CPU time is the fairer figure on a busy host). recops runs twice per pair: with
categoricals as Python ``str`` objects (what ``recops.training.readers`` yields; the headline) and as pandas
3 reads Parquet (Arrow-backed strings). recops: the reference statistics are built once (ingest time, from a
200k-row sample,
timed separately), then each report loads them and tests the current rows (the median of
``--repeats`` runs). Evidently 0.7.23 compares the full reference and current frames. Evidently
runs in its own venv (``--evidently-venv``, created on first use) so it never touches recops' pins.
The JSON goes to ``bench/results/drift_speed.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recops.bench.common import BENCH_DIR, bench_parser, format_table, pin_threads, run_main, write_result
from recops.errors import RecopsError

NAME = "drift_speed"
EVIDENTLY = ("evidently==0.7.23", "pandas<3", "pyarrow")  # evidently 0.7.23 does not import under pandas 3
STRONG = ("I1", "I2", "I3", "I5", "I8", "I11", "C1", "C2", "C3", "C6", "C9", "C14", "C18", "C20", "C24")


@dataclass(frozen=True)
class Pair:
    name: str
    seed: int
    covariate_drift: float = 0.0
    drift_features: tuple[str, ...] = ("I1", "I2", "C1", "C2", "C3")

    @property
    def planted(self) -> list[str]:
        return list(self.drift_features) if self.covariate_drift > 0 else []


PAIRS = (Pair("no_drift", 1), Pair("partial_drift", 2, 0.2), Pair("strong_drift", 3, 0.8, STRONG))


def _parser():
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--rows",
        default="1000000",
        help="rows of the reference and of each current set; a comma list runs several sizes",
    )
    parser.add_argument("--evidently-max-rows", type=int, default=10**9, help="run Evidently only at sizes up to this")
    parser.add_argument("--repeats", type=int, default=3, help="recops reports per pair (median reported)")
    parser.add_argument("--skip-evidently", action="store_true", help="run the recops side only")
    parser.add_argument("--evidently-venv", type=Path, default=Path(".venv-evidently"), help="venv holding evidently")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "recops-drift-bench",
        help="where the generated Parquet pairs are cached",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per report")
    return parser


def _data(work: Path, name: str, rows: int, **knobs) -> Path:
    """One synth set as Parquet (cached: the generator is deterministic)."""
    import pyarrow.parquet as pq

    from recops.training.synth import SynthConfig, generate, to_table

    path = work / f"{name}-{rows}.parquet"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        table = to_table(generate(SynthConfig(rows=rows, **knobs))).drop(["label"])
        pq.write_table(table, work / f".{path.name}.tmp")
        os.replace(work / f".{path.name}.tmp", path)
    return path


def _columns() -> list[str]:
    from recops.training.spec import CRITEO_DENSE, CRITEO_SPARSE

    return ["--dense", ",".join(CRITEO_DENSE), "--categorical", ",".join(CRITEO_SPARSE)]


def _worker(python: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    cmd = [
        str(python),
        str(BENCH_DIR / "drift_workers.py"),
        *args,
        *_columns(),
    ]  # a script: the evidently venv lacks recops
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise RecopsError(f"drift_speed: {args[0]} still running after {timeout_s:.0f} s; use --rows smaller") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RecopsError(
            f"drift_speed: {args[0]} worker failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
        )
    return json.loads(lines[-1])


def ensure_evidently(venv: Path) -> Path:
    """The venv's python, creating the venv and installing Evidently on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import evidently, sys; sys.exit(evidently.__version__ != '0.7.23')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing {' '.join(EVIDENTLY)} into {venv} ...", file=sys.stderr)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *EVIDENTLY], check=True)
    except subprocess.CalledProcessError as exc:
        raise RecopsError(
            f"drift_speed: could not install Evidently into {venv} ({exc}); use --skip-evidently"
        ) from exc
    return python


def _row(pair: Pair, tool: str, rows: int, result: dict[str, Any]) -> dict[str, Any]:
    flagged, planted = result["flagged"], pair.planted
    return {
        "pair": pair.name,
        "tool": tool,
        "rows": rows,
        "report_s": result["report_s"],
        "cpu_s": result["cpu_s"],
        **{k: result[k] for k in ("data_rss_mib", "report_peak_rss_mib", "peak_rss_mib")},
        "flagged": len(flagged),
        "planted": len(planted),
        "false_alarms": [f for f in flagged if f not in planted],
        "missed": [f for f in planted if f not in flagged],
    }


def _jobs(args, rows: int, work: Path, stats_dir: Path) -> list[tuple[str, Pair, Path, list[str]]]:
    """(tool, pair, python, worker args) of every report at one size."""
    jobs = []
    for pair in PAIRS:
        current = str(work / f"{pair.name}-{rows}.parquet")
        for tool, strings in (("recops", "object"), ("recops_native_strings", "native")):
            jobs.append(
                (
                    tool,
                    pair,
                    Path(sys.executable),
                    [
                        "recops",
                        "--current",
                        current,
                        "--out",
                        str(stats_dir),
                        "--repeats",
                        str(args.repeats),
                        "--strings",
                        strings,
                    ],
                )
            )
    if not args.skip_evidently and rows <= args.evidently_max_rows:
        python = ensure_evidently(args.evidently_venv)
        reference = str(work / f"reference-{rows}.parquet")
        jobs += [
            (
                "evidently",
                pair,
                python,
                ["evidently", "--reference", reference, "--current", str(work / f"{pair.name}-{rows}.parquet")],
            )
            for pair in PAIRS
        ]
    return jobs


def run_size(args, rows: int) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Every report at one size: rows, worker details, and errors (a failed report does not stop the rest)."""
    print(f"generating {rows}-row pairs in {args.work_dir} ...", file=sys.stderr)
    reference = _data(args.work_dir, "reference", rows, seed=0)
    for p in PAIRS:
        _data(
            args.work_dir, p.name, rows, seed=p.seed, covariate_drift=p.covariate_drift, drift_features=p.drift_features
        )
    stats_dir = Path(tempfile.mkdtemp(prefix="recops-drift-ref-"))
    details: dict[str, Any] = {
        "reference_build": _worker(
            Path(sys.executable), ["build", "--reference", str(reference), "--out", str(stats_dir)], args.timeout
        )
    }
    out_rows, errors = [], {}
    for tool, pair, python, worker_args in _jobs(args, rows, args.work_dir, stats_dir):
        key = f"{tool}/{pair.name}/{rows}"
        print(f"{key} ...", file=sys.stderr)
        try:
            details[key] = _worker(python, worker_args, args.timeout)
        except RecopsError as exc:
            errors[key] = str(exc)
            continue
        out_rows.append(_row(pair, tool, rows, details[key]))
    for row in out_rows:
        theirs = details.get(f"evidently/{row['pair']}/{rows}")
        if theirs and row["tool"] != "evidently":
            row["speedup_vs_evidently"] = theirs["report_s"] / row["report_s"]
            row["cpu_speedup_vs_evidently"] = theirs["cpu_s"] / row["cpu_s"]
    return out_rows, details, errors


def drift_plot(sizes: list[int]) -> dict[str, Any]:
    """Bars per scenario (and size), one per tool, on a log axis: 0.5 s and 260 s on one figure."""
    return {
        "kind": "bar",
        "x": "pair" if len(sizes) == 1 else ["pair", "rows"],
        "y": "report_s",
        "series": "tool",
        "log_y": True,
        "title": "drift report seconds per scenario (log scale)",
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = [20_000] if args.quick else sorted({int(r) for r in args.rows.split(",")})
    args.repeats = 1 if args.quick else args.repeats
    pin_threads(args.threads)
    rows, details, errors = [], {}, {}
    for size in sizes:
        size_rows, size_details, size_errors = run_size(args, size)
        rows += size_rows
        details[str(size)] = size_details
        errors.update(size_errors)
    config = {
        "rows": sizes,
        "repeats": args.repeats,
        "pairs": [{**asdict(p), "planted": p.planted} for p in PAIRS],
        "recops_reference_sample_rows": 200_000,
        "evidently_max_rows": args.evidently_max_rows,
        "evidently": None if args.skip_evidently else EVIDENTLY[0],
    }
    out = write_result(
        NAME,
        rows,
        args.results_dir,
        baseline="evidently",
        config=config,
        details=details,
        errors=errors,
        plots=[drift_plot(sizes)],
    )
    for size in sizes:
        build = details[str(size)]["reference_build"]
        print(
            f"recops reference build at {size} rows (once per dataset, sample of at most 200k rows): "
            f"{build['build_s']:.2f} s, "
            f"{build['cpu_s']:.2f} s CPU, {build['peak_rss_mib']:.0f} MiB peak"
        )
    print(
        format_table(
            rows,
            [
                "pair",
                "tool",
                "rows",
                "report_s",
                "cpu_s",
                "data_rss_mib",
                "report_peak_rss_mib",
                "peak_rss_mib",
                "speedup_vs_evidently",
                "cpu_speedup_vs_evidently",
                "flagged",
                "planted",
                "false_alarms",
                "missed",
            ],
        )
    )
    for key, message in errors.items():
        print(f"{key}: FAILED: {message}", file=sys.stderr)
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    run_main(main, "drift_speed")
