"""`recops monitor`: a window report (drift per feature, online quality, Triton latency/failures), once or watching."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag
from recops.ops.online import OnlineConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "monitor", help="drift, online CTR/AUC/logloss and Triton serving figures of the latest window"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--state-dir", type=Path, metavar="DIR", help="a `recops loop` state dir (its latest window)")
    source.add_argument("--predictions", type=Path, metavar="FILE", help="prediction log (JSONL with raw features)")
    p.add_argument("--feedback", type=Path, metavar="FILE", help="feedback log (JSONL), with --predictions")
    p.add_argument(
        "--reference", type=Path, metavar="DATASET_DIR", help="the served model's dataset, with --predictions"
    )
    online = OnlineConfig()
    p.add_argument("--window-s", type=float, default=online.window_s, help="window length (with --predictions)")
    p.add_argument("--max-delay-s", type=float, default=online.max_delay_s, help="feedback limit (with --predictions)")
    p.add_argument("--metrics-url", default=None, help="Triton /metrics URL (default: the loop's server, if any)")
    p.add_argument("--model", default=None, help="only this model's Triton figures")
    p.add_argument("--watch", type=float, default=0.0, metavar="S", help="repeat every S seconds (Ctrl-C stops)")
    p.add_argument(
        "--count", type=int, default=0, metavar="N", help="with --watch: stop after N reports (0 = no limit)"
    )
    p.add_argument(
        "--serve-metrics",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the figures as Prometheus /metrics on 127.0.0.1:PORT while watching (0 = any port)",
    )
    add_json_flag(p)
    p.set_defaults(func=monitor_command)


def _sources(args: argparse.Namespace):
    from recops.errors import RecopsError
    from recops.ops.monitor import MonitorSources

    if args.state_dir is not None:
        sources = MonitorSources.from_loop(args.state_dir, args.metrics_url)
        return sources if args.model is None else MonitorSources(**{**sources.__dict__, "model_name": args.model})
    if args.feedback is None or args.reference is None:
        raise RecopsError("--predictions needs --feedback FILE and --reference DATASET_DIR")
    return MonitorSources(
        args.predictions, args.feedback, args.reference, args.metrics_url, args.model, args.window_s, args.max_delay_s
    )


def monitor_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.exposition import Exporter, start_metrics_server
    from recops.ops.monitor import Monitor, format_report, report_dict

    monitor = Monitor(_sources(args))
    exporter = Exporter()
    server = (
        start_metrics_server(args.serve_metrics, registry=exporter.registry) if args.serve_metrics is not None else None
    )
    if server is not None:
        print(f"serving /metrics at {server.url}", flush=True)
    reports = 0
    try:
        while True:
            report = monitor.report()
            exporter.observe_online(report["online"])
            exporter.observe_drift(report["drift"])
            data = report_dict(report)
            reports += 1
            if not args.json or args.watch:
                print(format_report(data), flush=True)
            if not args.watch or (args.count and reports >= args.count):
                break
            time.sleep(args.watch)
            if args.state_dir is not None and (sources := _sources(args)) != monitor.sources:  # the loop moved on
                monitor.close()
                monitor = Monitor(sources)
    finally:
        monitor.close()
        if server is not None:
            server.stop()
    return {**data, "reports": reports} if args.json else {"reports": reports}
