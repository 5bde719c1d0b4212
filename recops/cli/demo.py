"""`recops demo`: the whole closed loop on synthetic data (sweep, export, Triton, drift, retrain, canary, promote)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo: train, serve with Triton, detect drift, retrain, "
        "canary and promote, with an HTML report",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where everything goes (default runs/demo; a previous demo there is replaced)",
    )
    parser.add_argument(
        "--rows", type=int, default=None, metavar="N", help="rows of initial training data (default 20000)"
    )
    parser.add_argument("--windows", type=int, default=None, metavar="N", help="windows of live traffic (default 8)")
    parser.add_argument("--window-rows", type=int, default=None, metavar="N", help="rows per window (default 4000)")
    parser.add_argument("--no-sweep", action="store_true", help="one training run instead of a Ray Tune sweep")
    parser.add_argument(
        "--retrain-sweep",
        action="store_true",
        help="retrain in the loop with a Ray Tune sweep too (default: a warm-started training run)",
    )
    add_json_flag(parser)
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.demo import demo_config, run_demo

    config = demo_config(
        workdir=args.workdir,
        rows=args.rows,
        windows=args.windows,
        window_rows=args.window_rows,
        use_sweep=False if args.no_sweep else None,
        retrain_sweep=args.retrain_sweep or None,
    )
    result = run_demo(config)
    if args.json:
        return result
    return {
        "report": result["report"],
        "production_before": result["production_before"],
        "production_after": result["production_after"],
        "total_s": result["timings_s"]["total"],
    }
