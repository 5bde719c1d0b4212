"""`recops predict`: score raw rows (Criteo TSV, CSV, Parquet) with a model served by Triton."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recops.cli.common import REPO_HELP, add_json_flag, model_repository, recover_deployment_of
from recops.errors import RecopsError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="score raw rows with a served model")
    parser.add_argument("--name", required=True, help="served model name")
    parser.add_argument("--input", required=True, type=Path, metavar="FILE", help="raw rows in the spec's format")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", default=None, help="server URL for --protocol (default: --repo's running server)")
    parser.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    parser.add_argument(
        "--version", type=int, default=None, help="model version to ask for (default: the server's latest)"
    )
    parser.add_argument(
        "--preprocess",
        type=Path,
        default=None,
        metavar="FILE",
        help="preprocessor JSON (Preprocessor.to_dict); default: preprocess.json in the model's "
        "version directory in --repo",
    )
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    add_json_flag(parser)
    parser.set_defaults(func=predict)


def _preprocessor(args: argparse.Namespace, repo: Path):
    """``--preprocess FILE``, else the one shipped with the asked (default: latest) version in ``repo``."""
    from recops.serving.onnx_model import read_preprocessor
    from recops.serving.repository import ModelRepository

    if args.preprocess is not None:
        return read_preprocessor_file(args.preprocess)
    models = ModelRepository(repo)
    versions = models.versions(args.name)
    if not versions:
        raise RecopsError(f"model {args.name!r} is not in {repo}: pass --repo or --preprocess FILE")
    if args.version is not None and args.version not in versions:
        raise RecopsError(f"model {args.name!r} has no version {args.version} in {repo} (versions: {versions})")
    return read_preprocessor(models.model_dir(args.name) / str(args.version or versions[-1]))


def read_preprocessor_file(path: Path):
    from recops.training.preprocess import Preprocessor

    try:
        return Preprocessor.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecopsError(f"preprocessor {path}: cannot read it ({exc}); pass a Preprocessor.to_dict() JSON") from exc


def _url(args: argparse.Namespace, repo: Path) -> str:
    from recops.serving.server import TritonServer

    if args.url:
        return args.url
    server = TritonServer.from_state(repo)
    return server.http_url if args.protocol == "http" else server.grpc_url


def predict(args: argparse.Namespace) -> dict[str, Any]:
    from recops.serving.client import Predictor
    from recops.serving.repository import validate_model_name
    from recops.training.readers import read_frame

    repo = model_repository(args)
    validate_model_name(args.name)
    url = _url(args, repo)
    recover_deployment_of(repo, args.name, url if args.protocol == "http" else None)
    preprocessor = _preprocessor(args, repo)
    frame = read_frame(args.input, preprocessor.spec, require_label=False)
    with Predictor(
        url,
        args.name,
        protocol=args.protocol,
        timeout_s=args.timeout,
        batch_size=args.batch_size,
        preprocess=preprocessor.transform,
    ) as predictor:
        if args.version is not None and not predictor.is_ready(args.version):
            raise RecopsError(
                f"model {args.name!r} has no version {args.version} ready on {url}; "
                "`recops serve status` lists the versions it serves"
            )
        result = predictor.predict(predictor.frame_inputs(frame), model_version=args.version or "")
    if len(result.outputs) != 1:
        raise RecopsError(f"model {args.name!r} has outputs {sorted(result.outputs)}; predict expects one score")
    scores = next(iter(result.outputs.values())).reshape(len(frame), -1)
    return {
        "name": args.name,
        "versions": sorted(set(result.model_versions)),
        "rows": len(frame),
        "mean": float(scores.mean()),
        "predictions": scores.squeeze(1).tolist() if scores.shape[1] == 1 else scores.tolist(),
    }
