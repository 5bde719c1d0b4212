"""`recops export`: a registered model version or checkpoint -> ONNX, parity-gated, into a Triton repository."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, REPO_HELP, add_json_flag, model_repository
from recops.serving.repository import TARGETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model to ONNX, check parity, add it to a Triton repository")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model-version", metavar="V|ALIAS", help="registered model version or alias (candidate, production, ...)"
    )
    source.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help="checkpoint directory (e.g. <run>/checkpoints/best); registered first if it is not yet",
    )
    parser.add_argument("--name", required=True, help="served model name in the repository")
    parser.add_argument("--repo", type=Path, default=None, metavar="DIR", help=REPO_HELP)
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default=None,
        help="cpu: python backend + onnxruntime (the local server); cpu-ort: Triton's onnxruntime backend on CPU "
        "instances; gpu: the onnxruntime backend on KIND_GPU (default: the model's current target, cpu for a new one)",
    )
    parser.add_argument(
        "--tensorrt",
        choices=("off", "fp32", "fp16"),
        default=None,
        help="gpu target: run through ONNX Runtime's TensorRT execution provider at this precision "
        "(default: the model's current setting, off for a new model)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gpu target with --tensorrt: CUDA graphs (trt_cuda_graph_enable; default: the current setting, off)",
    )
    parser.add_argument(
        "--raw-dense",
        choices=("fp32", "bytes"),
        default=None,
        help="datatype of the dense columns of the raw-feature model <name>_raw: fp32 (NaN = missing) or bytes "
        "(decimal text, empty = missing); default: the current setting, fp32 for a new model",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="FP16 weights and compute (GPU targets; gate tolerance 1e-2)"
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="always store weights in model.onnx.data (default: only above 1 GiB)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="processed dataset whose val split the parity gate scores (AUC check); "
        "without it only random inputs are compared",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=None,
        metavar="N",
        help="Triton model instances (per GPU on the gpu target; default: the model's current "
        "setting, 1 for a new model). On CPU, one per core lets concurrent requests overlap",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="onnxruntime intra-op threads per instance on the cpu target (default: current, 1)",
    )
    parser.add_argument("--registry", default=None, metavar="DIR", help=REGISTRY_HELP)
    add_json_flag(parser)
    parser.set_defaults(func=export)


def _options(args: argparse.Namespace, repo: Path):
    """The model's serving options with the options given applied; None (keep them) when none is given."""
    from dataclasses import replace

    from recops.errors import RecopsError
    from recops.serving.export import current_options
    from recops.serving.repository import GpuOptimization, ModelRepository

    current = current_options(ModelRepository(repo), args.name)
    counts = {
        k: v for k, v in (("instance_count", args.instances), ("intra_op_threads", args.threads)) if v is not None
    }
    if counts and min(counts.values()) < 1:
        raise RecopsError(f"--instances and --threads must be >= 1, got {counts}")
    changes = {**counts, **({"raw_dense": args.raw_dense.upper()} if args.raw_dense else {})}
    if args.tensorrt is not None or args.cuda_graphs is not None:
        tensorrt = (
            current.gpu.tensorrt if args.tensorrt is None else {"off": None}.get(args.tensorrt, args.tensorrt.upper())
        )
        cuda_graphs = current.gpu.cuda_graphs if args.cuda_graphs is None else args.cuda_graphs
        changes["gpu"] = GpuOptimization(tensorrt, cuda_graphs)
    return replace(current, **changes) if changes else None


def export(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.publish import publish_model, registered
    from recops.ops.registry import LocalRegistry
    from recops.serving.export import ExportConfig
    from recops.serving.repository import ModelRepository, validate_model_name
    from recops.training.checkpoint import Checkpoint

    validate_model_name(args.name)
    registry = LocalRegistry(args.registry)
    model = (
        registry.resolve(args.model_version)
        if args.model_version is not None
        else registered(registry, Checkpoint.open(args.checkpoint))
    )
    config = ExportConfig(fp16=args.fp16, external_data=True if args.external_data else None)
    repo = model_repository(args)
    result = publish_model(
        registry,
        model,
        ModelRepository(repo),
        args.name,
        target=args.target,
        config=config,
        options=_options(args, repo),
        dataset=args.data,
    )
    return {**result.to_dict(), "model_version": model.version, "parity": result.parity.to_dict()}
