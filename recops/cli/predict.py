"""`recops predict`: score raw rows (Criteo TSV, CSV, Parquet) with a model served by Triton.

Rows go to the model's raw-feature model when the repository has one and the server has it loaded (the server
preprocesses them and, without --version, the deployment's split picks the version per request by --key); with
--preprocess FILE, or else, they are preprocessed here and sent to the tensor-level model. Each row's answering
version is reported."""

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
        "--version",
        type=int,
        default=None,
        help="model version to ask for (default: the deployment's split on the raw-feature model, else the latest)",
    )
    parser.add_argument(
        "--key", default=None, help="routing key of the requests (raw-feature model; default: random per request)"
    )
    parser.add_argument(
        "--preprocess",
        type=Path,
        default=None,
        metavar="FILE",
        help="preprocessor JSON (Preprocessor.to_dict): preprocess here and send tensors to the tensor-level model; "
        "default: the raw-feature model preprocesses in the server (or preprocess.json of the model's version)",
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
    from recops.serving.client import Predictor, raw_predictor
    from recops.serving.repository import ModelRepository, validate_model_name
    from recops.training.readers import read_frame

    repo = model_repository(args)
    validate_model_name(args.name)
    url = _url(args, repo)
    recover_deployment_of(repo, args.name, url if args.protocol == "http" else None)
    preprocessor = _preprocessor(args, repo)
    frame = read_frame(args.input, preprocessor.spec, require_label=False)
    options = {"protocol": args.protocol, "timeout_s": args.timeout, "batch_size": args.batch_size}
    if args.version is not None:
        with Predictor(url, args.name, **options) as tensor_model:
            if not tensor_model.is_ready(args.version):
                raise RecopsError(
                    f"model {args.name!r} has no version {args.version} ready on {url}; "
                    "`recops serve status` lists the versions it serves"
                )
    raw = None if args.preprocess else raw_predictor(url, ModelRepository(repo), args.name, **options)
    if raw is not None:
        with raw:
            result = raw.predict_rows(frame, args.version, args.key, preprocessor.spec.separator)
    else:
        with Predictor(url, args.name, preprocess=preprocessor.transform, **options) as predictor:
            result = predictor.predict(predictor.frame_inputs(frame), model_version=args.version or "")
    scores = result.scores.reshape(len(frame), -1)
    return {
        "name": args.name,
        "model": raw.model_name if raw else args.name,
        "versions": sorted({str(v) for v in result.row_versions}),
        "rows": len(frame),
        "mean": float(scores.mean()),
        "predictions": scores.squeeze(1).tolist() if scores.shape[1] == 1 else scores.tolist(),
        "row_versions": result.row_versions.tolist(),
    }
