"""`recops serve`: start, stop, inspect a local Triton server; load and unload its models."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recops.cli.common import REPO_HELP, add_json_flag, model_repository


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run a local Triton server over a model repository")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    start = actions.add_parser(
        "start", help="start a daemon server (127.0.0.1; it runs on after this command), print its URLs and pid"
    )
    for proto in ("http", "grpc", "metrics"):
        start.add_argument(f"--{proto}-port", type=int, default=0, help=f"{proto} port (default: a free one)")
    start.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="NAME",
        help="model to load at start (repeatable); others are loaded with `serve load`",
    )
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    _common(start, start_server)

    stop = actions.add_parser(
        "stop", help="stop the server started for --repo, leaving no process behind (none running: a no-op)"
    )
    _common(stop, stop_server)

    status = actions.add_parser("status", help="URLs, readiness and model states")
    _common(status, server_status, url=True)

    for action, verb in (("load", "load (or reload to pick up new versions)"), ("unload", "unload")):
        control = actions.add_parser(action, help=f"{verb} a model")
        control.add_argument("name", help="model name in the repository")
        _common(control, control_model, url=True)


def _common(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], Any], url: bool = False) -> None:
    parser.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    if url:
        parser.add_argument("--url", default=None, help="HTTP URL of a running server (instead of --repo's)")
    add_json_flag(parser)
    parser.set_defaults(func=handler)


def _repo(args: argparse.Namespace) -> Path:
    return model_repository(args)


def _server(args: argparse.Namespace):
    from recops.serving.server import TritonServer

    return TritonServer.attach(args.url) if args.url else TritonServer.from_state(_repo(args))


def start_server(args: argparse.Namespace) -> dict[str, Any]:
    """A daemon server (it outlives this command; `serve stop` ends it), after recovering any deployment of the
    repository that a crash cut short."""
    from dataclasses import asdict

    from recops.serving.deploy import recover_repository
    from recops.serving.repository import ModelRepository, validate_model_name
    from recops.serving.server import ServerConfig, TritonServer, read_state

    for name in args.load:
        validate_model_name(name)
    running = read_state(_repo(args))
    recover_repository(ModelRepository(_repo(args)), running.http_url if running else None)
    config = ServerConfig(
        repo=_repo(args),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        startup_timeout_s=args.timeout,
        load_models=tuple(args.load),
        detach=True,
    )
    return asdict(TritonServer(config).start().state())


def stop_server(args: argparse.Namespace) -> dict[str, Any]:
    """Stop --repo's server; without one (or only the state file of a dead one) a no-op that says so."""
    from recops.serving.server import STATE_FILE, TritonServer, read_state

    repo = _repo(args).resolve()
    if read_state(repo) is None:
        (repo / STATE_FILE).unlink(missing_ok=True)
        return {"stopped": False, "repo": str(repo), "message": f"nothing was running for {repo}"}
    server = TritonServer.from_state(repo)
    pid = server.pid
    server.stop()
    return {"stopped": True, "pid": pid, "repo": str(server.repo)}


def server_status(args: argparse.Namespace) -> dict[str, Any]:
    from recops.serving.server import read_state

    if args.url is None and read_state(_repo(args)) is None:
        return {"running": False, "repo": str(_repo(args).resolve())}
    return {"running": True, **_server(args).status()}


def control_model(args: argparse.Namespace) -> dict[str, Any]:
    from recops.serving.repository import validate_model_name

    validate_model_name(args.name)
    server = _server(args)
    getattr(server, args.action)(args.name)
    return {"model": args.name, "action": args.action, "models": server.models()}
