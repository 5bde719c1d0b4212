"""`recops gpu`: read every GPU once (NVML), or sample for a while and summarise."""

from __future__ import annotations

import argparse
from typing import Any

from recops.cli.common import add_json_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gpu", help="GPU utilisation, memory, power and temperature (NVML)")
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="S",
        help="sample every S seconds for --duration and print the summary (default: one reading)",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, metavar="S", help="sampling time with --interval (default 5)"
    )
    add_json_flag(parser)
    parser.set_defaults(func=run_gpu)


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import time

    from recops.errors import RecopsError
    from recops.ops.gpu import gpu_monitor, read_gpus

    if args.interval is None:
        return read_gpus().to_dict()
    if args.interval <= 0 or args.duration <= 0:
        raise RecopsError(f"gpu: --interval and --duration must be > 0, got {args.interval} and {args.duration}")
    with gpu_monitor(interval_s=args.interval) as monitor:
        time.sleep(args.duration)
    summary = monitor.summary()
    return {
        "gpus": summary.pop("gpus"),
        **({"reason": summary["reason"]} if not summary["available"] else {}),
        "summary": summary,
    }
