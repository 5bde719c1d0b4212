"""`recops evaluate`: AUC, logloss, normalized entropy, calibration and per-slice AUC of a model on labelled rows."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag, add_model_source, open_model
from recops.training.dataset import SPLITS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a model on a dataset split or raw labelled files")
    add_model_source(p)
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DATASET_DIR|FILE",
        help="a processed dataset version (its --split) or raw labelled files (CSV/TSV/Parquet, gz, "
        "directories, globs)",
    )
    p.add_argument("--split", choices=SPLITS, default="test", help="with a dataset: the split (default test)")
    p.add_argument("--spec", type=Path, help="column spec of raw files (default: the model's)")
    p.add_argument("--slices", default="", metavar="COL,...", help="report AUC per frequent value of these columns")
    p.add_argument(
        "--compare",
        metavar="V|ALIAS|CHECKPOINT_DIR",
        help="also score the rows with this model: the difference with a bootstrap confidence interval",
    )
    add_json_flag(p)
    p.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.ops.evaluate import evaluate, labelled_rows
    from recops.training.spec import ColumnSpec

    scorer = open_model(args)
    other = _other(args) if args.compare else None
    try:
        rows = labelled_rows(
            args.data,
            scorer.preprocessor,
            args.split,
            ColumnSpec.load(args.spec) if args.spec else None,
            tuple(c for c in args.slices.split(",") if c),
        )
        report = evaluate(scorer, rows, other)
    finally:
        scorer.close()
        if other is not None:
            other.close()
    if args.json:
        return report
    return {k: v for k, v in report.items() if k not in ("slices",)} | {
        "slices": {
            column: [(s["value"], s["rows"], s["auc"]) for s in values] for column, values in report["slices"].items()
        }
    }


def _other(args: argparse.Namespace):
    compare = Path(args.compare)
    ns = argparse.Namespace(**{**vars(args), "url": None, "name": None, "checkpoint": None, "model_version": None})
    if compare.is_dir():
        ns.checkpoint = compare
    else:
        ns.model_version = args.compare
    return open_model(ns)
