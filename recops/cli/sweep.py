"""`recops sweep`: a Ray Tune sweep of sharded TorchRec training; registers the best model as `candidate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep with Ray Tune (local Ray or --address of a cluster)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, help="sweep YAML (see docs/sweeps.md)")
    what.add_argument("--resume", type=Path, metavar="DIR", help="experiment directory of an interrupted sweep")
    p.add_argument(
        "--address",
        help="Ray cluster to attach to (auto, HOST:PORT or ray://HOST:10001); default: $RAY_ADDRESS (set inside a "
        "Ray job), else a local Ray",
    )
    p.add_argument("--registry", type=Path, help=REGISTRY_HELP)
    p.add_argument("--alias", default="candidate", help="alias for the registered best model (default: candidate)")
    p.add_argument("--no-register", action="store_true", help="do not register the best model")
    add_json_flag(p)
    p.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.registry import LocalRegistry
    from recops.ops.retrain import register_best, sweep_and_register
    from recops.training.sweep import ranking_table, ray_address, resume_sweep
    from recops.training.sweep_config import load_sweep_config

    registry = LocalRegistry(args.registry)
    address = ray_address(args.address)
    if args.resume:
        result = resume_sweep(args.resume, address=address)
        parent = registry.resolve(result.config.warm_start).version if result.config.warm_start is not None else None
        version = (
            None
            if args.no_register or result.status == "interrupted"
            else register_best(result, registry, args.alias, parent)
        )
    else:
        result, version = sweep_and_register(
            load_sweep_config(args.config, local=not address),
            registry,
            address,
            args.alias,
            register=not args.no_register,
        )
    if result.status == "interrupted":
        print(f"recops sweep: interrupted; resume with: recops sweep --resume {result.experiment_dir}", file=sys.stderr)
        raise KeyboardInterrupt
    if not args.json:
        print(ranking_table(result))
    best = result.best_metrics
    return {
        "experiment_dir": str(result.experiment_dir),
        "sweep_id": result.sweep_id,
        "status": result.status,
        "num_trials": len(result.trials),
        "num_errors": result.num_errors,
        "best_trial": result.best_trial,
        "metric": result.config.metric,
        "best_metric": best.get(result.config.metric),
        "best_auc": best.get("auc"),
        "best_logloss": best.get("logloss"),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "best_params": result.best_params.get("searched", {}),
        "model_version": version.version if version else None,
        "alias": args.alias if version else None,
        "wall_s": result.wall_s,
    }
