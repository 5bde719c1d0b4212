"""Input files as users name them: files, directories (every regular file in it, not hidden) and glob patterns
(``day_*.gz``), expanded in a stable order; nothing named may match nothing."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from recops.errors import RecopsError


def expand_inputs(names: Iterable[str | Path]) -> list[Path]:
    """The files ``names`` stand for, each once, in the order given (a directory's or pattern's sorted by name)."""
    found: list[Path] = []
    for name in names:
        text = str(name)
        if any(c in text for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            matches = [Path(text)] if Path(text).is_file() else []
        if not matches:
            raise RecopsError(
                f"input {text}: no such file, or no file matches; pass files, a directory or a glob "
                "such as 'data/day_*.gz'"
            )
        found += [p for p in matches if p not in found]
    return found
