"""`recops bench`: run the benchmark suite and render bench/results/REPORT.md + report.html."""

from __future__ import annotations

import argparse
from typing import Any

from recops.cli.common import add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (JSON, plots, Markdown + HTML report in bench/results/)")
    from recops.bench.suite import add_arguments

    add_arguments(p)
    add_json_flag(p)
    p.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.bench.suite import run_from_args

    return run_from_args(args)
