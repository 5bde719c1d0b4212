"""`recops loop`: run the closed loop (drift -> retrain -> gate -> canary -> promote) over a stream directory."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag, model_repository, REGISTRY_HELP, REPO_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("loop", help="watch a stream of labelled windows against a served model; retrain, "
                                           "validate, canary and promote on drift")
    p.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                   help="the loop's state, events, logs and data (a restarted loop resumes from it)")
    p.add_argument("--stream", type=Path, required=True, metavar="DIR",
                   help="directory of window-00000.tsv, window-00001.tsv, ... (Criteo rows, label = feedback)")
    p.add_argument("--name", required=True, help="served model name")
    p.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    p.add_argument("--url", default=None, help="server HTTP URL (default: the server recorded for --repo)")
    p.add_argument("--metrics-url", default=None, help="Triton /metrics URL (default: the server recorded for --repo)")
    p.add_argument("--datasets", type=Path, default=None, metavar="DIR",
                   help="dataset root holding the production model's dataset; new datasets go here too "
                        "(default <state-dir>/datasets)")
    p.add_argument("--registry", type=Path, default=None, metavar="DIR",
                   help=REGISTRY_HELP)
    p.add_argument("--window-s", type=float, default=300.0, help="seconds of stream time per window (default 300)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="first write N synthetic windows into --stream (missing ones only)")
    p.add_argument("--rows", type=int, default=4000, help="rows per synthetic window (default 4000)")
    p.add_argument("--drift-at", type=int, default=5, metavar="W", help="first synthetic window with drift (default 5)")
    p.add_argument("--covariate-drift", type=float, default=0.5, help="synthetic covariate drift 0..1 (default 0.5)")
    p.add_argument("--concept-drift", type=float, default=0.0, help="synthetic concept drift 0..1 (default 0)")
    p.add_argument("--follow", action="store_true", help="wait for new windows instead of stopping at the last one")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="process at most N windows this run")
    p.add_argument("--use-sweep", action="store_true", help="retrain with a small Ray Tune sweep instead of one run")
    p.add_argument("--sweep-config", type=Path, default=None, metavar="YAML", help="sweep template for retraining")
    p.add_argument("--drift-windows", type=int, default=3, help="consecutive drifted windows that trigger (default 3)")
    p.add_argument("--quality-windows", type=int, default=2, help="consecutive worse windows that trigger (default 2)")
    p.add_argument("--min-new-rows", type=int, default=5_000_000, help="new labelled rows that trigger (default 5e6)")
    p.add_argument("--cooldown-s", type=float, default=3600.0, help="no trigger this long after the last (default 3600)")
    p.add_argument("--gate-auc-margin", type=float, default=0.01, help="holdout AUC the candidate may lose (default 0.01)")
    p.add_argument("--canary-share", type=float, default=0.1, help="share of keys the canary serves (default 0.1)")
    p.add_argument("--canary-windows", type=int, default=1, help="windows the canary runs before the decision (default 1)")
    p.add_argument("--report", action="store_true", help="write <state-dir>/report/report.html at the end")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve the loop's figures (online quality, drift, policy, model) as Prometheus /metrics on "
                        "--metrics-address:PORT while it runs (0 = any free port)")
    p.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDR",
                   help="address the /metrics endpoint binds (default 127.0.0.1; 0.0.0.0 in a pod Prometheus "
                        "scrapes)")
    add_json_flag(p)
    p.set_defaults(func=loop_command)


def loop_config(args: argparse.Namespace):
    from dataclasses import replace

    from recops.ops.loop import CanaryConfig, GateConfig, LoopConfig, RetrainConfig
    from recops.ops.policy import PolicyConfig
    from recops.serving.server import TritonServer
    from recops.errors import RecopsError

    repo = model_repository(args)
    server = TritonServer.attach(args.url) if args.url else TritonServer.from_state(repo)
    if args.sweep_config is not None and not args.sweep_config.is_file():
        raise RecopsError(f"--sweep-config {args.sweep_config} does not exist; pass a sweep YAML")
    return LoopConfig(
        state_dir=args.state_dir, stream_dir=args.stream, repo=repo, model_name=args.name, server_url=server.http_url,
        datasets_root=args.datasets, registry=args.registry, metrics_url=args.metrics_url or server.metrics_url or None,
        window_s=args.window_s, feedback_delay_s=min(30.0, args.window_s / 10),
        policy=PolicyConfig(drift_windows=args.drift_windows, quality_windows=args.quality_windows,
                            min_new_rows=args.min_new_rows, cooldown_s=args.cooldown_s),
        retrain=RetrainConfig(use_sweep=args.use_sweep, sweep_config=args.sweep_config),
        gate=replace(GateConfig(), auc_margin=args.gate_auc_margin),
        canary=CanaryConfig(share=args.canary_share, windows=args.canary_windows))


def loop_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.exposition import Exporter, start_metrics_server
    from recops.ops.loop import Loop
    from recops.ops.report import write_report
    from recops.ops.stream import StreamConfig, write_synthetic_stream

    if args.synthetic:
        write_synthetic_stream(StreamConfig(windows=args.synthetic, rows=args.rows, drift_at=args.drift_at,
                                            covariate_drift=args.covariate_drift, concept_drift=args.concept_drift),
                               args.stream)
    exporter = Exporter() if args.metrics_port is not None else None
    server = start_metrics_server(args.metrics_port, args.metrics_address, exporter.registry) if exporter else None
    if server is not None:
        print(f"serving /metrics at {server.url}", flush=True)
    try:
        with Loop(loop_config(args), exporter) as loop:
            state = loop.run(max_windows=args.max_windows, follow=args.follow,
                             on_event=lambda e: print(f"{e['kind']:<18} {e['reason']}", flush=True))
    finally:
        if server is not None:
            server.stop()
    counts: dict[str, int] = {}
    for event in loop.events():
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return {"state_dir": str(loop.state_dir), "step": state.step, "next_window": state.next_window,
            "production_version": state.production.repo_version,
            "canary_version": state.canary.repo_version if state.canary else None, "retrains": state.retrains,
            "events": counts, "report": str(write_report(loop.state_dir)) if args.report else None}
