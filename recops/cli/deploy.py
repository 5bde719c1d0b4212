"""`recops deploy`: put a model version into production (or a canary), promote or roll back, on a running server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, REPO_HELP, add_json_flag, model_repository, recover_deployment_of
from recops.errors import RecopsError
from recops.serving.deploy import DeployConfig
from recops.serving.repository import TARGETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="deploy, canary, promote or roll back a served model version")
    parser.add_argument("--name", required=True, help="served model name")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--version", type=int, metavar="V", help="repository version to deploy")
    action.add_argument("--promote", action="store_true", help="make the canary production")
    action.add_argument(
        "--rollback",
        action="store_true",
        help="drop the canary, or without one bring back the previous production version",
    )
    action.add_argument("--status", action="store_true", help="show the deployment record only")
    parser.add_argument(
        "--canary",
        type=float,
        default=None,
        metavar="F",
        help="with --version: serve it to this share of traffic (0..1) beside production",
    )
    parser.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    parser.add_argument("--url", default=None, help="HTTP URL of the server (default: --repo's running server)")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default=None,
        help="serving target (default: the one the model's config.pbtxt uses)",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=DeployConfig.drain_s,
        metavar="S",
        help="seconds between pointing routers at a new production version and unloading the old one",
    )
    parser.add_argument(
        "--registry",
        type=Path,
        default=None,
        metavar="DIR",
        help=REGISTRY_HELP + "; it records which of its versions serve where",
    )
    add_json_flag(parser)
    parser.set_defaults(func=deploy)


def deploy(args: argparse.Namespace) -> dict[str, Any]:
    from recops.serving.deploy import Deployer, committed_state
    from recops.serving.journal import Journal
    from recops.serving.repository import ModelRepository, validate_model_name
    from recops.serving.server import TritonServer

    repo = ModelRepository(model_repository(args))
    validate_model_name(args.name)
    if args.canary is not None and args.version is None:
        raise RecopsError("--canary F needs --version V (the version to run as a canary)")
    if args.status:
        recover_deployment_of(repo.root, args.name, args.url)
        in_flight = Journal(repo, args.name).read()
        return {
            "name": args.name,
            **committed_state(repo, args.name).summary(),
            "in_flight": in_flight.describe() if in_flight else None,
        }
    from recops.ops.publish import record_deployment  # imports torch: not for --status
    from recops.ops.registry import LocalRegistry

    server = TritonServer.attach(args.url) if args.url else TritonServer.from_state(repo.root)
    deployer = Deployer(server, repo, args.name, DeployConfig(target=args.target, drain_s=args.drain))
    before = deployer.state()
    if args.promote:
        state = deployer.promote()
    elif args.rollback:
        state = deployer.rollback()
    else:
        state = deployer.deploy(args.version, canary=args.canary)
    record_deployment(LocalRegistry(args.registry), repo, args.name, before, state)
    return {"name": args.name, **state.summary()}
