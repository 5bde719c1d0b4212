"""`recops loop`: run the closed loop (drift -> retrain -> gate -> canary -> promote) over a stream directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, REPO_HELP, add_json_flag, model_repository
from recops.errors import RecopsError
from recops.ops.loop_config import CanaryConfig, GateConfig, LoopConfig, RetrainConfig
from recops.ops.policy import PolicyConfig
from recops.ops.stream import StreamConfig
from recops.training.synth import SynthConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "loop",
        help="watch a stream of labelled windows against a served model; retrain, "
        "validate, canary and promote on drift",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the loop's state, events, logs and data (a restarted loop resumes from it)",
    )
    p.add_argument(
        "--stream",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory of window-00000.tsv, window-00001.tsv, ... (labelled rows in the production "
        "dataset's format; the label is the feedback)",
    )
    p.add_argument("--name", required=True, help="served model name")
    p.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    p.add_argument("--url", default=None, help="server HTTP URL (default: the server recorded for --repo)")
    p.add_argument("--metrics-url", default=None, help="Triton /metrics URL (default: the server recorded for --repo)")
    p.add_argument(
        "--datasets",
        type=Path,
        default=None,
        metavar="DIR",
        help="where new datasets go (default <state-dir>/datasets)",
    )
    p.add_argument("--registry", type=Path, default=None, metavar="DIR", help=REGISTRY_HELP)
    p.add_argument(
        "--window-s",
        type=float,
        default=LoopConfig.window_s,
        help="seconds of stream time per window (default %(default)s)",
    )
    synthetic = p.add_argument_group("synthetic stream")
    synthetic.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="first write N synthetic windows into --stream (missing ones only)",
    )
    synthetic.add_argument("--rows", type=int, default=StreamConfig.rows, help="rows per window (default %(default)s)")
    synthetic.add_argument(
        "--drift-at",
        type=int,
        default=StreamConfig.drift_at,
        metavar="W",
        help="first window with drift (default %(default)s)",
    )
    synthetic.add_argument("--covariate-drift", type=float, default=0.5, help="covariate drift 0..1 (default 0.5)")
    synthetic.add_argument("--concept-drift", type=float, default=0.0, help="concept drift 0..1 (default 0)")
    p.add_argument("--follow", action="store_true", help="wait for new windows instead of stopping at the last one")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="process at most N windows this run")
    p.add_argument("--use-sweep", action="store_true", help="retrain with a small Ray Tune sweep instead of one run")
    p.add_argument("--sweep-config", type=Path, default=None, metavar="YAML", help="sweep template for retraining")
    for flag, config, key, what in _DEFAULTS:
        p.add_argument(
            flag, type=type(getattr(config, key)), default=getattr(config, key), help=f"{what} (default %(default)s)"
        )
    p.add_argument("--report", action="store_true", help="write <state-dir>/report/report.html at the end")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the loop's figures (online quality, drift, policy, model) as Prometheus /metrics on "
        "--metrics-address:PORT while it runs (0 = any free port)",
    )
    p.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        metavar="ADDR",
        help="address the /metrics endpoint binds (default 127.0.0.1; 0.0.0.0 in a pod Prometheus scrapes)",
    )
    add_json_flag(p)
    p.set_defaults(func=loop_command)


_DEFAULTS = (  # flag, config class, field, help: the defaults are the dataclasses'
    ("--drift-windows", PolicyConfig, "drift_windows", "consecutive drifted windows that trigger"),
    ("--quality-windows", PolicyConfig, "quality_windows", "consecutive worse windows that trigger"),
    ("--min-new-rows", PolicyConfig, "min_new_rows", "new labelled rows that trigger"),
    ("--cooldown-s", PolicyConfig, "cooldown_s", "no trigger this long after the last"),
    ("--gate-auc-margin", GateConfig, "auc_margin", "holdout AUC the candidate may lose"),
    ("--canary-share", CanaryConfig, "share", "share of keys the canary serves"),
    ("--canary-windows", CanaryConfig, "windows", "windows the canary runs before the decision"),
)


def loop_config(args: argparse.Namespace) -> LoopConfig:
    from recops.serving.server import TritonServer

    server = TritonServer.attach(args.url) if args.url else TritonServer.from_state(model_repository(args))
    if args.sweep_config is not None and not args.sweep_config.is_file():
        raise RecopsError(f"--sweep-config {args.sweep_config} does not exist; pass a sweep YAML")
    return LoopConfig(
        state_dir=args.state_dir,
        stream_dir=args.stream,
        repo=model_repository(args),
        model_name=args.name,
        server_url=server.http_url,
        datasets_root=args.datasets,
        registry=args.registry,
        metrics_url=args.metrics_url or server.metrics_url or None,
        window_s=args.window_s,
        feedback_delay_s=min(30.0, args.window_s / 10),
        policy=PolicyConfig(
            drift_windows=args.drift_windows,
            quality_windows=args.quality_windows,
            min_new_rows=args.min_new_rows,
            cooldown_s=args.cooldown_s,
        ),
        retrain=RetrainConfig(use_sweep=args.use_sweep, sweep_config=args.sweep_config),
        gate=GateConfig(auc_margin=args.gate_auc_margin),
        canary=CanaryConfig(share=args.canary_share, windows=args.canary_windows),
    )


def loop_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.exposition import Exporter, start_metrics_server
    from recops.ops.loop import Loop
    from recops.ops.report import write_report
    from recops.ops.stream import write_synthetic_stream

    if args.synthetic:
        synth = SynthConfig(
            seed=StreamConfig.synth.seed, covariate_drift=args.covariate_drift, concept_drift=args.concept_drift
        )
        write_synthetic_stream(
            StreamConfig(windows=args.synthetic, rows=args.rows, drift_at=args.drift_at, synth=synth), args.stream
        )
    exporter = Exporter() if args.metrics_port is not None else None
    server = start_metrics_server(args.metrics_port, args.metrics_address, exporter.registry) if exporter else None
    if server is not None:
        print(f"serving /metrics at {server.url}", flush=True)

    try:
        with Loop(loop_config(args), exporter) as loop:
            state = loop.run(
                max_windows=args.max_windows,
                follow=args.follow,
                on_event=lambda e: print(f"{e['kind']:<18} {e['reason']}", flush=True),
            )
    finally:
        if server is not None:
            server.stop()
    counts: dict[str, int] = {}
    for event in loop.events():
        counts[event["kind"]] = counts.get(event["kind"], 0) + 1
    return {
        "state_dir": str(loop.state_dir),
        "step": state.step.value,
        "next_window": state.next_window,
        "production_version": state.production.repo_version,
        "canary_version": state.canary.repo_version if state.canary else None,
        "retrains": state.retrains,
        "events": counts,
        "report": str(write_report(loop.state_dir)) if args.report else None,
    }
