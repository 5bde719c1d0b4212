"""`recops models`: list, show, register and alias model versions; trace a served version to its registry record."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, REPO_HELP, add_json_flag, model_repository
from recops.errors import RecopsError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, show, register and alias registered model versions")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every registered version with its aliases, dataset and metrics")
    _common(listing, list_models)

    show = actions.add_parser("show", help="one version's record: metrics, dataset, lineage, where it is served")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", metavar="V|ALIAS", help="registry version or alias")
    which.add_argument(
        "--served",
        metavar="NAME[:VERSION]",
        help="the registry record of a served model version (default: its production version)",
    )
    show.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    _common(show, show_model)

    add = actions.add_parser("register", help="register a training run's best checkpoint (or a checkpoint dir)")
    add.add_argument("run", type=Path, metavar="RUN_DIR|CHECKPOINT_DIR")
    add.add_argument("--alias", default=None, help="alias to point at it (e.g. candidate)")
    _common(add, register_model)

    alias = actions.add_parser("alias", help="point an alias (candidate, production, archived, ...) at a version")
    alias.add_argument("version", metavar="V|ALIAS")
    alias.add_argument("name", help="alias name matching [a-z][a-z0-9_-]*")
    alias.add_argument("--reason", default="", help="why, recorded in the alias history")
    _common(alias, alias_model)


def _common(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], Any]) -> None:
    parser.add_argument("--registry", type=Path, default=None, metavar="DIR", help=REGISTRY_HELP)
    add_json_flag(parser)
    parser.set_defaults(func=handler)


def _registry(args: argparse.Namespace):
    from recops.ops.registry import LocalRegistry

    return LocalRegistry(args.registry)


def list_models(args: argparse.Namespace) -> dict[str, Any] | None:
    registry = _registry(args)
    versions, broken = [v.to_dict() for v in registry.list()], registry.broken()
    if args.json:
        return {"versions": versions, "broken": {str(k): v for k, v in broken.items()}}
    _print_table(versions)
    for version, problem in broken.items():
        print(f"{version}  BROKEN  {problem}")
    return None


def show_model(args: argparse.Namespace) -> dict[str, Any]:
    registry = _registry(args)
    if args.version is not None:
        return registry.resolve(args.version).to_dict()
    from recops.ops.publish import served_lineage, served_registry_version
    from recops.serving.deploy import read_deploy_state
    from recops.serving.repository import ModelRepository

    repo = ModelRepository(model_repository(args))
    name, _, version = args.served.partition(":")
    served = int(version) if version else read_deploy_state(repo, name).production
    if served is None:
        raise RecopsError(f"model {name!r} has no production version in {repo.root}; pass --served {name}:VERSION")
    lineage = served_lineage(repo, name, served)
    if lineage is None:
        raise RecopsError(f"{name} version {served} in {repo.root} has no export.json (not exported by recops)")
    registered = served_registry_version(registry, repo, name, served)
    return {
        "served": {"model": name, "version": served, "repository": str(repo.root.resolve())},
        "lineage": lineage.to_dict(),
        "registry": registry.get(registered).to_dict() if registered else None,
    }


def register_model(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.publish import register_checkpoint
    from recops.training.checkpoint import Checkpoint

    path = args.run / "checkpoints" / "best" if (args.run / "checkpoints").is_dir() else args.run
    registry = _registry(args)
    checkpoint = Checkpoint.open(path)
    found = registry.find(checkpoint.fingerprint)
    version = found or register_checkpoint(registry, checkpoint)
    if args.alias:
        registry.set_alias(version.version, args.alias, reason=f"registered from {path}")
    return {**registry.get(version.version).to_dict(), "already_registered": found is not None}


def alias_model(args: argparse.Namespace) -> dict[str, Any]:
    registry = _registry(args)
    version = registry.resolve(args.version).version
    event = registry.set_alias(version, args.name, reason=args.reason)
    return {
        "alias": args.name,
        "version": version,
        "moved": event is not None,
        "event": asdict(event) if event else None,
    }


def _print_table(versions: list[dict[str, Any]]) -> None:
    if not versions:
        print("no registered models")
        return
    rows = [("VERSION", "ALIASES", "DATASET", "CREATED", "METRICS")]
    for v in versions:
        metrics = " ".join(f"{k}={_short(x)}" for k, x in sorted(v["metrics"].items()))
        rows.append((str(v["version"]), ",".join(v["aliases"]) or "-", v["dataset"]["version"], v["created"], metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
