"""`recops train`: train a TorchRec DLRM / DLRM-DCN on a processed dataset."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DLRM on a dataset version (single process or sharded)")
    p.add_argument("--data", type=Path, required=True, help="processed dataset directory (from `recops data ingest`)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics, result.json)")
    p.add_argument("--model", choices=("dlrm", "dcn"), default="dlrm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nproc", type=int, default=1, help="processes on this host (sharded DMP; gloo on CPU, nccl on GPU)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--dense-arch", type=_ints, default=(64, 32), help="e.g. 64,32")
    p.add_argument("--over-arch", type=_ints, default=(128, 64), help="e.g. 128,64")
    p.add_argument("--embedding-optimizer", choices=("adagrad", "sgd"), default="adagrad")
    p.add_argument("--embedding-lr", type=float, default=0.05)
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--sharding-type", default="table_wise", help="table_wise, column_wise, data_parallel (CPU); +row_wise on GPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    add_json_flag(p)
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.training.model import ModelConfig
    from recops.training.train import TrainConfig, fit

    arch = ModelConfig(family=args.model, embedding_dim=args.embedding_dim,
                       dense_arch=args.dense_arch, over_arch=args.over_arch)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, embedding_optimizer=args.embedding_optimizer,
                      embedding_lr=args.embedding_lr, dense_lr=args.dense_lr, sharding_type=args.sharding_type,
                      device=args.device, seed=args.seed)

    def progress(metrics: dict[str, Any], _ckpt: Path | None) -> None:
        if not args.json:
            print(f"epoch {metrics['epoch']}: val_auc={metrics['val_auc']:.4f} val_logloss={metrics['val_logloss']:.4f} "
                  f"samples/s={metrics['samples_per_s']:.0f}", flush=True)

    result = fit(args.data, arch, cfg, args.out, nproc=args.nproc, resume=not args.no_resume, report=progress)
    return {"auc": result.auc, "logloss": result.logloss, "val_auc": result.val_auc,
            "samples_per_s": result.samples_per_s, "epochs": result.epochs, "checkpoint": result.checkpoint}
