"""`recops score`: batch scoring of unlabelled rows into Parquet or CSV (or Parquet shards), in process, through
Triton, or in Ray tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recops.cli.common import add_engine_flags, add_json_flag, add_model_source, engine_config, model_factory


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
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="scores: .parquet, .csv or .tsv, or a directory (no suffix) of Parquet shards part-00000.parquet, ... "
        "in input order (what --engine ray writes)",
    )
    p.add_argument("--id-columns", default="", metavar="COL,...", help="input columns copied next to each score")
    p.add_argument("--spec", type=Path, help="column spec of the input (default: the model's)")
    add_engine_flags(p)
    add_json_flag(p)
    p.set_defaults(func=score_command)


def score_command(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from recops.ops.score import ScoreConfig, check_output, score_files
    from recops.training.inputs import expand_inputs
    from recops.training.spec import ColumnSpec

    config = ScoreConfig(args.output, tuple(c for c in args.id_columns.split(",") if c))  # checked before any work
    engine = engine_config(args)
    check_output(config, engine)
    inputs = expand_inputs(args.input)
    factory = model_factory(args)
    with tqdm(unit=" rows", unit_scale=True, disable=not sys.stderr.isatty(), desc="score") as bar:
        return score_files(
            factory,
            inputs,
            config,
            ColumnSpec.load(args.spec) if args.spec else None,
            progress=lambda n: bar.update(n - bar.n),
            engine=engine,
        )
