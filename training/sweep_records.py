"""What a sweep records per trial (``trials/<id>/work/events.jsonl``) and the tables it prints; shared by the
driver (``recops.training.sweep``) and its Tune callbacks (``recops.training.sweep_callbacks``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def trial_work_dir(experiment_dir: Path, trial_id: str) -> Path:
    return experiment_dir / "trials" / trial_id / "work"


def read_events(work: Path) -> list[dict[str, Any]]:
    """A trial's events.jsonl (see :func:`log_event`)."""
    path = work / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_event(work: Path, event: str, **fields: Any) -> None:
    """Append one line to the trial's events.jsonl: "trial" (Tune started the trial), "start" (rank 0 began training,
    once per attempt, with the node of every rank and a Train worker group's placement group), "epoch" (after Tune or
    Train holds that epoch's checkpoint) and "released" (the driver checked that a finished trial's placement group
    is gone, ``by`` whom)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields}) + "\n")


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt_value(v) for v in value) + "]"
    return str(value)


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
