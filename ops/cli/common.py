"""Helpers shared by the command modules."""
from __future__ import annotations

import argparse
import json
from typing import Any


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
