"""`recops train`: train a TorchRec DLRM / DLRM-DCN on a processed dataset and register its best checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import REGISTRY_HELP, add_json_flag
from recops.errors import RecopsError
from recops.training.config import EMBEDDING_OPTIMIZERS, FAMILIES, LR_SCHEDULES, ModelConfig, TrainConfig


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 64,32") from None


def _dims(text: str) -> dict[str, int] | str:
    """``auto`` or ``C1=8,C2=4``."""
    if text == "auto":
        return text
    try:
        return {name: int(dim) for name, dim in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or FEATURE=DIM,... such as C1=8,C2=4") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DLRM on a dataset version (single process or sharded) and register it")
    p.add_argument("--data", type=Path, required=True, help="processed dataset directory (from `recops data ingest`)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics, result.json)")
    p.add_argument(
        "--nproc", type=int, default=1, help="processes on this host (sharded DMP; gloo on CPU, nccl on GPU)"
    )
    model, train = ModelConfig(), TrainConfig()
    arch = p.add_argument_group("architecture (defaults: recops.training.config.ModelConfig)")
    arch.add_argument("--model", choices=FAMILIES, default=model.family, help="dlrm (dot interaction) or dcn")
    arch.add_argument("--embedding-dim", type=int, default=model.embedding_dim, help="default %(default)s")
    arch.add_argument(
        "--embedding-dims",
        type=_dims,
        default=model.embedding_dims,
        metavar="auto|F=D,...",
        help="per-table dims: auto = min(dim, 6 * rows^0.25), or FEATURE=DIM pairs",
    )
    arch.add_argument("--dense-arch", type=_ints, default=model.dense_arch, help="e.g. 64,32")
    arch.add_argument("--over-arch", type=_ints, default=model.over_arch, help="e.g. 128,64")
    arch.add_argument("--dcn-layers", type=int, default=model.dcn_layers, help="DCN cross layers (default %(default)s)")
    arch.add_argument("--dcn-rank", type=int, default=model.dcn_low_rank, help="DCN low rank (default %(default)s)")
    opt = p.add_argument_group("optimisation (defaults: recops.training.config.TrainConfig)")
    opt.add_argument(
        "--epochs",
        type=int,
        default=train.epochs,
        help="at most this many; training stops earlier when validation AUC stops improving (default %(default)s)",
    )
    opt.add_argument(
        "--patience",
        type=int,
        default=train.patience,
        help="epochs without a better validation AUC before stopping (default %(default)s)",
    )
    opt.add_argument("--batch-size", type=int, default=train.batch_size)
    opt.add_argument("--embedding-optimizer", choices=EMBEDDING_OPTIMIZERS, default=train.embedding_optimizer)
    opt.add_argument("--embedding-lr", type=float, default=train.embedding_lr)
    opt.add_argument("--dense-lr", type=float, default=train.dense_lr)
    opt.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=train.lr_schedule)
    opt.add_argument("--max-rows", type=int, default=train.max_train_rows, help="train on at most N rows (0 = all)")
    opt.add_argument(
        "--sharding-type",
        default=train.sharding_type,
        help="table_wise, column_wise, data_parallel (CPU); + row_wise, table_row_wise on GPU",
    )
    opt.add_argument("--device", choices=("auto", "cpu", "cuda"), default=train.device)
    opt.add_argument("--seed", type=int, default=train.seed)
    p.add_argument(
        "--warm-start",
        metavar="V|ALIAS",
        default=None,
        help="start from a registered model's weights (its architecture; same tables and preprocessing)",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint of this run")
    p.add_argument("--registry", type=Path, default=None, metavar="DIR", help=REGISTRY_HELP)
    p.add_argument("--alias", default=None, help="alias to point at the registered version (e.g. candidate)")
    p.add_argument("--no-register", action="store_true", help="do not register the best checkpoint")
    add_json_flag(p)
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from recops.ops.registry import LocalRegistry
    from recops.ops.retrain import register_run
    from recops.training.checkpoint import Checkpoint
    from recops.training.train import fit

    registry = LocalRegistry(args.registry)
    parent = registry.resolve(args.warm_start) if args.warm_start else None
    arch = ModelConfig(
        family=args.model,
        embedding_dim=args.embedding_dim,
        embedding_dims=args.embedding_dims,
        dense_arch=args.dense_arch,
        over_arch=args.over_arch,
        dcn_layers=args.dcn_layers,
        dcn_low_rank=args.dcn_rank,
    )
    if parent is not None:  # the parent's architecture: its weights must fit
        arch = replace(Checkpoint.open(parent.checkpoint).meta.model, tables={})
    cfg = TrainConfig(
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        embedding_optimizer=args.embedding_optimizer,
        embedding_lr=args.embedding_lr,
        dense_lr=args.dense_lr,
        lr_schedule=args.lr_schedule,
        max_train_rows=args.max_rows,
        sharding_type=args.sharding_type,
        device=args.device,
        seed=args.seed,
    )
    if args.alias and args.no_register:
        raise RecopsError("--alias needs registration; drop --no-register")

    def progress(metrics: dict[str, Any], _ckpt: Path | None) -> None:
        if not args.json:
            print(
                f"epoch {metrics['epoch']}: val_auc={metrics['val_auc']:.4f} val_logloss={metrics['val_logloss']:.4f} "
                f"samples/s={metrics['samples_per_s']:.0f}",
                flush=True,
            )

    result = fit(
        args.data,
        arch,
        cfg,
        args.out,
        nproc=args.nproc,
        resume=not args.no_resume,
        report=progress,
        warm_start=parent.checkpoint if parent else None,
    )
    version = (
        None
        if args.no_register
        else register_run(registry, result, parent.version if parent else None, alias=args.alias)
    )
    return {
        **{k: v for k, v in result.to_dict().items() if k != "history"},
        "model_version": version.version if version else None,
    }
