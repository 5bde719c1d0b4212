"""`recops models`: list, show and alias registered model versions."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any, Callable

from recops.cli.common import add_json_flag, REGISTRY_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, show and alias registered model versions")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every registered version with its aliases and metrics")
    _common(listing, list_models)

    show = actions.add_parser("show", help="one version's full record")
    show.add_argument("version", type=int)
    _common(show, show_model)

    alias = actions.add_parser("alias", help="point an alias (candidate, production, archived, ...) at a version")
    alias.add_argument("version", type=int)
    alias.add_argument("name", help="alias name matching [a-z][a-z0-9_-]*")
    alias.add_argument("--reason", default="", help="why, recorded in the alias history")
    _common(alias, alias_model)


def _common(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], Any]) -> None:
    parser.add_argument("--registry", default=None, metavar="DIR",
                        help=REGISTRY_HELP)
    add_json_flag(parser)
    parser.set_defaults(func=handler)


def _registry(args: argparse.Namespace):
    from recops.ops.registry import LocalRegistry

    return LocalRegistry(args.registry)


def list_models(args: argparse.Namespace) -> dict[str, Any] | None:
    versions = [v.to_dict() for v in _registry(args).list()]
    if args.json:
        return {"versions": versions}
    _print_table(versions)
    return None


def show_model(args: argparse.Namespace) -> dict[str, Any]:
    return _registry(args).get(args.version).to_dict()


def alias_model(args: argparse.Namespace) -> dict[str, Any]:
    event = _registry(args).set_alias(args.version, args.name, reason=args.reason)
    return {"alias": args.name, "version": args.version, "moved": event is not None,
            "event": asdict(event) if event else None}


def _print_table(versions: list[dict[str, Any]]) -> None:
    if not versions:
        print("no registered models")
        return
    rows = [("VERSION", "ALIASES", "DATASET", "CREATED", "METRICS")]
    for v in versions:
        metrics = " ".join(f"{k}={_short(x)}" for k, x in sorted(v["metrics"].items()))
        rows.append((str(v["version"]), ",".join(v["aliases"]) or "-", v["dataset_version"], v["created"], metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)
