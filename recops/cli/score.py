"""`recops score`: batch scoring of unlabelled rows into Parquet or CSV, in process or through Triton."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag, add_model_source, open_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score rows (labels not needed) into a Parquet or CSV file")
    add_model_source(p)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="rows in the model's format: CSV/TSV/Parquet, gzip, directories or globs",
    )
    p.add_argument("--output", type=Path, required=True, help="scores: .parquet, .csv or .tsv")
    p.add_argument("--id-columns", default="", metavar="COL,...", help="input columns copied next to each score")
    p.add_argument("--spec", type=Path, help="column spec of the input (default: the model's)")
    add_json_flag(p)
    p.set_defaults(func=score_command)


def score_command(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from recops.ops.score import ScoreConfig, score_files
    from recops.training.inputs import expand_inputs
    from recops.training.spec import ColumnSpec

    config = ScoreConfig(args.output, tuple(c for c in args.id_columns.split(",") if c))  # checked before any work
    inputs = expand_inputs(args.input)
    scorer = open_model(args)
    try:
        with tqdm(unit=" rows", unit_scale=True, disable=not sys.stderr.isatty(), desc="score") as bar:
            return score_files(
                scorer,
                inputs,
                config,
                ColumnSpec.load(args.spec) if args.spec else None,
                progress=lambda n: bar.update(n - bar.n),
            )
    finally:
        scorer.close()
