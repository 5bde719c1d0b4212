"""Helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recops.settings import settings

REPO_HELP = "Triton model repository (default: $RECOPS_MODEL_REPOSITORY or triton_models)"
REGISTRY_HELP = "model registry directory (default: $RECOPS_REGISTRY or runs/registry)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: one JSON line with --json, else aligned key: value lines."""
    if as_json:
        print(json.dumps(result, default=str, sort_keys=True), flush=True)
        return
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key:<{width}}  {value}")


def model_repository(args: argparse.Namespace) -> Path:
    """``--repo``, else the settings' model repository."""
    return args.repo or settings().model_repository


def recover_deployment_of(repo: Path, name: str, url: str | None = None) -> None:
    """Before a command uses model ``name``: bring a deployment of it that a crash cut short back to its last committed
    state, on the server at ``url`` (HTTP) or else ``repo``'s recorded server (in the repository only when none runs).
    A deployment in progress in a live process is left alone."""
    from recops.serving.deploy import recover_deployment
    from recops.serving.repository import ModelRepository
    from recops.serving.server import read_state

    recorded = read_state(repo) if url is None else None
    recover_deployment(ModelRepository(repo), name, url or (recorded.http_url if recorded else None), wait=False)


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """The options naming the model that scores (``recops evaluate``, ``recops score``)."""
    source = parser.add_argument_group("model (choose one)")
    source.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="a checkpoint directory (<run>/checkpoints/best)"
    )
    source.add_argument("--model-version", metavar="V|ALIAS", help="a registered version or alias (candidate, ...)")
    source.add_argument("--url", help="a running Triton server (with --name)")
    source.add_argument("--name", help="the served model's name (with --url)")
    source.add_argument("--version", type=int, help="the served version (default: production, else the latest)")
    source.add_argument("--protocol", choices=("http", "grpc"), default="http", help="with --url")
    parser.add_argument(
        "--repo",
        type=Path,
        default=None,
        metavar="DIR",
        help=REPO_HELP + "; with --url the served version's preprocessing is read from it",
    )
    parser.add_argument("--registry", type=Path, default=None, metavar="DIR", help=REGISTRY_HELP)


def model_factory(args: argparse.Namespace):
    """The factory of the scorer the model options name (local models are exported once under <runs>/scoring)."""
    from recops.ops.evaluate import ModelSource, scorer_factory
    from recops.ops.registry import LocalRegistry
    from recops.serving.repository import ModelRepository

    source = ModelSource(args.checkpoint, args.model_version, args.url, args.name, args.version, args.protocol)
    return scorer_factory(
        source, LocalRegistry(args.registry), ModelRepository(model_repository(args)), settings().runs / "scoring"
    )


def open_model(args: argparse.Namespace):
    """The scorer the model options name."""
    return model_factory(args).open()


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--address``, ``--workers``, ``--range-mb``: where the heavy data work runs."""
    from recops.training.engine import ENGINES, RANGE_BYTES

    group = parser.add_argument_group("engine (the same result either way)")
    group.add_argument(
        "--engine", choices=ENGINES, default="local", help="local: this process (default); ray: Ray tasks in parallel"
    )
    group.add_argument(
        "--address",
        help="with --engine ray: the Ray cluster (auto, HOST:PORT or ray://HOST:10001); default: a local Ray",
    )
    group.add_argument(
        "--workers", type=int, help="with --engine ray: parallel tasks (default: the machine's or cluster's CPUs)"
    )
    group.add_argument(
        "--range-mb",
        type=float,
        help=f"cut plain text files larger than this many MiB into line-aligned ranges of about that size, one "
        f"task each (default with --engine ray: {RANGE_BYTES >> 20}; locally: whole files)",
    )


def engine_config(args: argparse.Namespace):
    """The EngineConfig of the engine flags."""
    from recops.training.engine import EngineConfig

    ranges = None if args.range_mb is None else int(args.range_mb * (1 << 20))
    return EngineConfig(args.engine, args.address, args.workers, ranges)
