"""Tune callbacks of a sweep (driver side only): the live trial table and the release of placement groups
that stopped trials leave behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from recops.training.sweep_records import fmt_value, format_table, log_event, read_events, trial_work_dir

RELEASE_GRACE_S = 5.0  # lets the stopped trial's actor, and with it its Train controller, die first


def live_enabled() -> bool:
    """Only on a terminal, never in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class LiveTable(Callback):
    """Redraws trial / status / epoch / metric / params on stderr at most every ``interval_s`` seconds when it
    changed."""

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
            rows.append(
                [t.trial_id, t.status, fmt_value(last.get("epoch", "-")), fmt_value(last.get(self.metric, "-")), params]
            )
        shown = format_table(rows)
        if shown == self._shown:
            return
        clear = f"\x1b[{self._lines}F\x1b[J" if self._lines else ""  # move up over the previous table and clear it
        sys.stderr.write(clear + shown + "\n")
        sys.stderr.flush()
        self._last, self._lines, self._shown = time.monotonic(), shown.count("\n") + 1, shown


class ReleaseStoppedTrials(Callback):
    """Removes the placement group of a trial's Ray Train workers once Tune has ended the trial.

    When Tune stops a trial (ASHA) or loses its actor, the trial's Train controller dies with it, and Ray
    Train's own cleanup of the worker placement group needs the dashboard's state API, which a plain
    ``ray[tune]`` install lacks: the reserved CPUs/GPUs would stay taken and later trials pend forever.
    The placement groups come from the trial's "start" events; a finished trial's are already gone.
    """

    def __init__(self) -> None:
        self._due: list[tuple[float, Path, set[str]]] = []

    def _schedule(self, trial: Any) -> None:
        work = trial_work_dir(Path(trial.path).parent.parent, trial.trial_id)  # trial.path = <experiment>/tune/<id>
        groups = {e["placement_group"] for e in read_events(work) if e["event"] == "start" and e.get("placement_group")}
        if groups:
            self._due.append((time.monotonic() + RELEASE_GRACE_S, work, groups))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._schedule(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._schedule(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._schedule(trial)  # only the groups of attempts so far; the restarted attempt makes a new one

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        for entry in [d for d in self._due if d[0] <= now]:
            self._due.remove(entry)
            for group in entry[2]:
                by = "recops" if _remove_placement_group(group) else "ray"  # Ray Train sometimes frees it itself
                log_event(entry[1], "released", placement_group=group, by=by)


def _remove_placement_group(hex_id: str) -> bool:
    """Remove a placement group that still holds resources; True if it did."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group = PlacementGroup(ray.PlacementGroupID.from_hex(hex_id))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(group)
    return True
