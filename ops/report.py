"""An HTML report of a loop's events: online metrics over time, drift per feature, model versions.

``write_report(state_dir, out_dir)`` reads ``events.jsonl`` (``recops.ops.loop``), draws three PNGs with
matplotlib's Agg backend (``metrics.png``, ``drift.png``, ``versions.png``) into ``out_dir`` and writes
``report.html`` there, with the PNGs embedded (the file stands alone) and the event timeline.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from recops.errors import RecopsError
from recops.files import atomic_path, write_json_atomic, write_text_atomic
from recops.ops.loop_state import read_events

MARKERS = {  # kind -> colour, legend label, offset after its window (events of one window stay apart)
    "retrain_started": ("tab:orange", "retrain", 0.3),
    "validation_failed": ("tab:red", "validation failed", 0.5),
    "canary_started": ("tab:purple", "canary", 0.6),
    "promoted": ("tab:green", "promoted", 0.5),
    "rolled_back": ("tab:red", "rolled back", 0.5),
}


def _windows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Window events, the last record of each window index (a reprocessed window replaces the first)."""
    by_index = {e["window"]: e for e in events if e["kind"] == "window"}
    return [by_index[i] for i in sorted(by_index)]


def _window_of(event: dict[str, Any], events: list[dict[str, Any]]) -> float | None:
    """Where on the window axis an event happened: after its window, else after the last window before it."""
    offset = MARKERS[event["kind"]][2]
    if event.get("window") is not None:
        return event["window"] + offset
    before = [e["window"] for e in events if e["kind"] == "window" and e["seq"] < event["seq"]]
    return before[-1] + offset if before else None


def _mark_events(ax, events: list[dict[str, Any]]) -> None:
    seen = set()
    for event in events:
        if event["kind"] in MARKERS and (x := _window_of(event, events)) is not None:
            color, label, _ = MARKERS[event["kind"]]
            ax.axvline(x, color=color, linestyle=":", linewidth=1.2, label=None if label in seen else label)
            seen.add(label)


def _metrics_plot(ax_auc, ax_loss, windows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    versions = sorted({v for w in windows for v in w["arms"]}, key=int)
    for version in versions:
        xs = [w["window"] for w in windows if w["arms"].get(version, {}).get("auc") is not None]
        arms = [w["arms"][version] for w in windows if w["arms"].get(version, {}).get("auc") is not None]
        ax_auc.plot(xs, [a["auc"] for a in arms], marker="o", label=f"v{version}")
        ax_loss.plot(xs, [a["logloss"] for a in arms], marker="o", label=f"v{version}")
    oracle = [(w["window"], w["oracle_auc"]) for w in windows if w.get("oracle_auc") is not None]
    if oracle:
        ax_auc.plot(*zip(*oracle), color="grey", linestyle="--", label="oracle (planted)")
    for ax, title in ((ax_auc, "online AUC per served version"), (ax_loss, "online logloss")):
        _mark_events(ax, events)
        ax.set_title(title)
        ax.set_xlabel("window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _drift_plot(fig, ax, windows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    features = list(windows[0]["drift"])
    ratio = np.full((len(features), len(windows)), np.nan)
    for j, w in enumerate(windows):
        for i, f in enumerate(features):
            test = w["drift"].get(f, {})
            if test.get("value") is not None and test.get("threshold"):
                ratio[i, j] = test["value"] / test["threshold"]
    image = ax.imshow(
        np.clip(ratio, 0, 3),
        aspect="auto",
        cmap="magma_r",
        vmin=0,
        vmax=3,
        extent=(windows[0]["window"] - 0.5, windows[-1]["window"] + 0.5, len(features) - 0.5, -0.5),
    )
    for w in windows:
        for i, f in enumerate(features):
            if w["drift"].get(f, {}).get("drifted"):
                ax.text(w["window"], i, "x", ha="center", va="center", color="cyan", fontsize=7)
    ax.set_yticks(range(len(features)), features, fontsize=6)
    ax.set_xlabel("window")
    ax.set_title("drift per feature: test statistic / threshold (x = drifted)")
    _mark_events(ax, events)
    fig.colorbar(image, ax=ax, label="value / threshold (clipped at 3)")


def _versions_plot(ax_v, ax_lat, windows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    xs = [w["window"] for w in windows]
    ax_v.step(xs, [w["production"] for w in windows], where="mid", label="production", color="tab:blue")
    canary = [(w["window"], w["canary"]) for w in windows if w.get("canary") is not None]
    if canary:
        ax_v.scatter(*zip(*canary), color="tab:purple", label="canary", zorder=3)
    ax_v.set_ylabel("repository version")
    ax_v.yaxis.get_major_locator().set_params(integer=True)
    ax_v.set_title("served model versions")
    latency = [
        (w["window"], v.get("mean_latency_ms"))
        for w in windows
        for v in (w.get("triton") or {}).values()
        if isinstance(v, dict) and v.get("mean_latency_ms")
    ]
    if latency:
        ax_lat.scatter(*zip(*latency), color="tab:gray", s=12)
    ax_lat.set_ylabel("Triton mean request latency (ms)")
    ax_lat.set_xlabel("window")
    for ax in (ax_v, ax_lat):
        _mark_events(ax, events)
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def draw_plots(events: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The three PNGs for ``events`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = _windows(events)
    if not windows:
        raise RecopsError("report: the loop processed no window yet; run it on a stream first")
    paths = [out_dir / "metrics.png", out_dir / "drift.png", out_dir / "versions.png"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    _metrics_plot(a, b, windows, events)
    _save(fig, paths[0])
    fig, ax = plt.subplots(figsize=(12, 7))
    _drift_plot(fig, ax, windows, events)
    _save(fig, paths[1])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.5))
    _versions_plot(a, b, windows, events)
    _save(fig, paths[2])
    return paths


def _timeline_rows(events: list[dict[str, Any]]) -> str:
    start = events[0]["t"] if events else 0.0
    rows = []
    for e in events:
        rows.append(
            f"<tr class='{e['kind']}'><td>{e['t'] - start:7.1f}s</td><td>{e.get('window', '')}</td>"
            f"<td>{html.escape(e['kind'])}</td><td>{html.escape(str(e.get('reason', '')))}</td></tr>"
        )
    return "\n".join(rows)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    image = f"<img src='data:image/png;base64,{data}' alt='{path.stem}'>"
    return f"<figure>{image}<figcaption>{path.name}</figcaption></figure>"


def render_html(events: list[dict[str, Any]], plots: list[Path], summary: dict[str, Any]) -> str:
    facts = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fact(v))}</td></tr>" for k, v in summary.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>recops closed loop report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; }}
img {{ max-width: 100%; }} tr.window td {{ color: #666; }}
tr.promoted {{ background: #e6ffe6; }} tr.rolled_back, tr.validation_failed, tr.error {{ background: #ffe6e6; }}
tr.drift_detected, tr.retrain_started {{ background: #fff4e0; }}
</style></head><body>
<h1>recops closed loop</h1>
<table>{facts}</table>
<h2>Online metrics</h2>{_img(plots[0])}
<h2>Model versions and serving latency</h2>{_img(plots[2])}
<h2>Drift per feature</h2>{_img(plots[1])}
<h2>Timeline</h2>
<table><tr><th>time</th><th>window</th><th>event</th><th>reason</th></tr>
{_timeline_rows(events)}
</table></body></html>
"""


def _fact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def write_report(state_dir: Path, out_dir: Path | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` (+ PNGs, + ``summary.json``) for the loop in ``state_dir``; returns the HTML path."""
    events = read_events(Path(state_dir))
    out_dir = Path(out_dir or Path(state_dir) / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(events, out_dir)
    counts: dict[str, int] = {}
    for e in events:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    facts = {**(summary or {}), "events": ", ".join(f"{k} x{n}" for k, n in counts.items())}
    path = out_dir / "report.html"
    write_text_atomic(path, render_html(events, plots, facts))
    write_json_atomic(out_dir / "summary.json", facts)
    return path
