"""Live progress of a sweep: a compact trial table redrawn on stderr while Tune runs (driver side only)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from ray.tune import Callback

from training.sweep import format_table, fmt_value


def live_enabled() -> bool:
    """Only on a terminal, never in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class LiveTable(Callback):
    """Redraws trial / status / epoch / metric / params at most every ``interval_s`` seconds when it changed."""

    def __init__(self, metric: str, interval_s: float = 2.0):
        self.metric, self.interval_s = metric, interval_s
        self._last, self._lines, self._shown = 0.0, 0, ""

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if not live_enabled() or time.monotonic() - self._last < self.interval_s:
            return
        rows = [["trial", "status", "epoch", self.metric, "params"]]
        for t in trials:
            last = t.last_result or {}
            params = " ".join(f"{k}={fmt_value(v)}" for k, v in (t.config or {}).items())
            rows.append([t.trial_id, t.status, fmt_value(last.get("epoch", "-")), fmt_value(last.get(self.metric, "-")), params])
        shown = format_table(rows)
        if shown == self._shown:
            return
        clear = f"\x1b[{self._lines}F\x1b[J" if self._lines else ""  # move up over the previous table and clear it
        sys.stderr.write(clear + shown + "\n")
        sys.stderr.flush()
        self._last, self._lines, self._shown = time.monotonic(), shown.count("\n") + 1, shown
