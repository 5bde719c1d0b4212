"""Helpers shared by the command modules."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recops.settings import settings

REPO_HELP = "Triton model repository (default: $RECOPS_MODEL_REPOSITORY or triton_models)"
REGISTRY_HELP = "model registry directory (default: $RECOPS_REGISTRY or runs/registry)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print a command's result: one JSON line with --json, else aligned key: value lines."""
    if as_json:
        print(json.dumps(result, default=str, sort_keys=True), flush=True)
        return
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key:<{width}}  {value}")


def model_repository(args: argparse.Namespace) -> Path:
    """``--repo``, else the settings' model repository."""
    return args.repo or settings().model_repository
