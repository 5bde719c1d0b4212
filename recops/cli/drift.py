"""`recops drift`: compare a file of live rows with a processed dataset's reference statistics."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recops.cli.common import add_json_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("drift", help="per-feature data drift of a file against a dataset's reference")
    parser.add_argument(
        "--reference",
        required=True,
        metavar="DATASET_DIR",
        help="processed dataset directory (holds manifest.json, stats.json, reference_sample.npz)",
    )
    parser.add_argument(
        "--current",
        required=True,
        metavar="FILE",
        help="rows to check, in the dataset's raw format (Criteo TSV by default)",
    )
    parser.add_argument(
        "--alpha", type=float, default=None, help="false-alarm probability of a no-drift report (default 0.01)"
    )
    add_json_flag(parser)
    parser.set_defaults(func=run_drift)


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    from recops.errors import RecopsError
    from recops.ops.drift import DriftConfig, detect_drift
    from recops.training.readers import read_chunks
    from recops.training.stats import load_reference

    reference = load_reference(Path(args.reference))  # carries the dataset's schema
    chunks = list(read_chunks(Path(args.current), reference.spec, require_label=False))
    rejected = sum(len(c.rejects) for c in chunks)
    frames = [c.frame for c in chunks if len(c.frame)]
    if not frames:
        raise RecopsError(
            f"input {args.current}: no valid rows ({rejected} rejected); pass rows in the dataset's format"
        )
    config = DriftConfig() if args.alpha is None else DriftConfig(alpha=args.alpha)
    result = {
        **detect_drift(reference, pd.concat(frames, ignore_index=True), config).to_dict(),
        "rejected_rows": rejected,
    }
    if args.json:
        return result
    _print_table(result["features"])
    return {k: v for k, v in result.items() if k != "features"}


def _print_table(features: dict[str, dict[str, Any]]) -> None:
    print(f"{'feature':<10}{'test':<9}{'value':>10}{'threshold':>11}  drifted")
    for name, row in features.items():
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        print(f"{name:<10}{row['test']:<9}{value:>10}{row['threshold']:>11.4f}  {'YES' if row['drifted'] else '-'}")
