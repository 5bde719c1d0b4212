"""`recops data synth|ingest`: synthetic Criteo-shaped data and versioned processed datasets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_engine_flags, add_json_flag, engine_config
from recops.errors import RecopsError
from recops.settings import settings
from recops.training.dataset import SplitConfig
from recops.training.spec import PreprocessConfig
from recops.training.synth import SynthConfig


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="generate synthetic data or ingest raw data into a versioned dataset")
    data_sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = data_sub.add_parser("synth", help="write Criteo-format TSV with a planted click function")
    defaults = SynthConfig()
    synth.add_argument("--rows", type=int, default=defaults.rows, help="default %(default)s")
    synth.add_argument("--out", type=Path, required=True, help="output directory (data.tsv, truth.npy)")
    synth.add_argument("--seed", type=int, default=defaults.seed, help="row sampling seed")
    synth.add_argument(
        "--world-seed", type=int, default=defaults.world_seed, help="seed of the fixed distributions and click function"
    )
    synth.add_argument(
        "--covariate-drift",
        type=float,
        default=defaults.covariate_drift,
        help="0..1: shift of the drift features' distributions",
    )
    synth.add_argument(
        "--concept-drift",
        type=float,
        default=defaults.concept_drift,
        help="0..1: blend of the click function towards another",
    )
    synth.add_argument(
        "--drift-features",
        default=",".join(defaults.drift_features),
        help="comma-separated features moved by covariate drift (default %(default)s)",
    )
    add_json_flag(synth)
    synth.set_defaults(func=synth_command)

    ingest = data_sub.add_parser("ingest", help="raw file(s) -> versioned processed dataset under --out")
    ingest.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="Criteo TSV, CSV or Parquet (plain or gzip): files, directories or globs such as "
        "'day_*.gz' (with --val-input/--test-input: the training rows, less the files those name)",
    )
    ingest.add_argument(
        "--out",
        type=Path,
        default=None,
        help="dataset root; the version becomes a sub-directory (default: $RECOPS_DATASETS or runs/datasets)",
    )
    ingest.add_argument("--spec", type=Path, help="column spec YAML (default: Criteo TSV); see README 'Your data'")
    pre, split = PreprocessConfig(), SplitConfig()
    ingest.add_argument(
        "--table-size",
        type=int,
        default=pre.table_size,
        help="hash buckets per categorical feature (default %(default)s)",
    )
    ingest.add_argument(
        "--min-frequency", type=int, default=pre.min_frequency, help=">0: vocabulary of values seen this often"
    )
    how = ingest.add_argument_group("split (default: random by --val-fraction/--test-fraction)")
    how.add_argument("--val-fraction", type=float, default=split.val_fraction, help="default %(default)s")
    how.add_argument("--test-fraction", type=float, default=split.test_fraction, help="default %(default)s")
    how.add_argument(
        "--seed",
        type=int,
        default=split.seed,
        help="seed of the random split and the reference sample (default %(default)s)",
    )
    how.add_argument("--val-input", nargs="+", default=[], metavar="FILE", help="validation rows: split by file")
    how.add_argument(
        "--test-input",
        nargs="+",
        default=[],
        metavar="FILE",
        help="test rows: split by file (e.g. the last day: --test-input day_23.gz)",
    )
    how.add_argument("--split-column", metavar="NAME", help="a column holding train, val or test for each row")
    how.add_argument(
        "--time-column",
        metavar="NAME",
        help="a column holding times (numbers or dates); with --val-from and --test-from",
    )
    how.add_argument("--val-from", metavar="T", help="with --time-column: first time of the validation rows")
    how.add_argument("--test-from", metavar="T", help="with --time-column: first time of the test rows")
    add_engine_flags(ingest)
    add_json_flag(ingest)
    ingest.set_defaults(func=ingest_command)


def synth_command(args: argparse.Namespace) -> dict[str, Any]:
    from recops.training.synth import write

    cfg = SynthConfig(
        rows=args.rows,
        seed=args.seed,
        world_seed=args.world_seed,
        covariate_drift=args.covariate_drift,
        concept_drift=args.concept_drift,
        drift_features=tuple(f for f in args.drift_features.split(",") if f),
    )
    return write(cfg, args.out)


def split_config(args: argparse.Namespace) -> SplitConfig:
    """The split the ingest flags ask for (one way at a time)."""
    ways = [bool(args.val_input or args.test_input), bool(args.split_column), bool(args.time_column)]
    if sum(ways) > 1:
        raise RecopsError("choose one split: --val-input/--test-input, --split-column, or --time-column")
    if (args.val_from or args.test_from) and not args.time_column:
        raise RecopsError("--val-from/--test-from need --time-column")
    method = "files" if ways[0] else "column" if ways[1] else "time" if ways[2] else "random"
    return SplitConfig(
        method=method,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        column=args.split_column or args.time_column,
        val_from=args.val_from,
        test_from=args.test_from,
    )


def training_files(train: list[Path], held_out: list[Path]) -> list[Path]:
    """``--input``'s files less the ``--val-input``/``--test-input`` ones, so ``--input 'day_*.gz' --test-input
    day_23.gz`` trains on days 0-22 only."""
    held = {p.resolve() for p in held_out}
    kept = [p for p in train if p.resolve() not in held]
    if not kept:
        raise RecopsError("--input names only files that --val-input/--test-input hold out: no training rows left")
    return kept


def ingest_command(args: argparse.Namespace) -> dict[str, Any]:
    import sys

    from tqdm import tqdm

    from recops.training.dataset import ingest
    from recops.training.inputs import expand_inputs
    from recops.training.spec import ColumnSpec

    spec = ColumnSpec.load(args.spec) if args.spec else ColumnSpec.criteo()
    config = PreprocessConfig(table_size=args.table_size, min_frequency=args.min_frequency)
    split, engine = split_config(args), engine_config(args)
    files = {
        k: expand_inputs(v) if v else []
        for k, v in (("train", args.input), ("val", args.val_input), ("test", args.test_input))
    }
    files["train"] = training_files(files["train"], files["val"] + files["test"])
    with tqdm(unit=" rows", unit_scale=True, disable=not sys.stderr.isatty(), desc="ingest") as bar:
        dataset = ingest(
            files["train"],
            args.out or settings().datasets,
            spec,
            config,
            split,
            progress=lambda n: bar.update(n - bar.n),
            val_inputs=files["val"],
            test_inputs=files["test"],
            engine=engine,
        )
    return dataset.summary()
