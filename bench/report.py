"""Render the benchmark results in a directory as ``REPORT.md`` + ``report.html`` with PNG plots.

Input: ``suite.json`` (statuses, logs and GPU samples written by ``bench/suite.py``; optional) and
every other ``*.json`` result written by ``recops.bench.common.write_result``. Each plot shows absolute
numbers (titled with the hardware they were measured on) and, when the result names a baseline,
each series as a ratio against the baseline measured in the same run. ``python -m recops.bench.report DIR``.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recops.bench.catalog import BENCHMARKS
from recops.bench.common import default_results_dir, format_cell, portable
from recops.errors import RecopsError
from recops.files import write_text_atomic

MARKDOWN, HTML, GPU_PLOT = "REPORT.md", "report.html", "gpu_utilisation.png"


@dataclass
class Doc:
    """The report as blocks (heading, text, table, image, code), rendered to Markdown and to HTML."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
        columns = columns or list(dict.fromkeys(k for row in rows for k in row))
        self.blocks.append(("table", (columns, [[format_cell(_flat(r.get(c))) for c in columns] for r in rows])))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("image", (path, alt)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"{'#' * value[0]} {value[1]}")
            elif kind == "text":
                out.append(value)
            elif kind == "table":
                columns, cells = value
                out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
            elif kind == "image":
                out.append(f"![{value[1]}]({value[0].name})")
            else:
                out.append("```\n" + value.rstrip() + "\n```")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        esc = html.escape
        out = [
            f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
            "th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}"
            "img{max-width:100%}</style></head><body>"
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h{value[0]}>{esc(value[1])}</h{value[0]}>")
            elif kind == "text":
                out.append(f"<p>{_inline(value)}</p>")
            elif kind == "table":
                columns, cells = value
                out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells]
                out.append("</table>")
            elif kind == "image":
                data = base64.b64encode(value[0].read_bytes()).decode()
                out.append(f"<p><img alt='{esc(value[1])}' src='data:image/png;base64,{data}'></p>")
            else:
                out.append(f"<pre>{esc(value)}</pre>")
        return "\n".join(out + ["</body></html>"])


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in a paragraph, as HTML."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)).replace("\n", "<br>")


def _flat(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ys(spec: dict[str, Any]) -> list[str]:
    return [spec["y"]] if isinstance(spec["y"], str) else list(spec["y"])


def _groups(result: dict[str, Any], spec: dict[str, Any], key_of) -> dict[str, dict[Any, dict[str, Any]]]:
    """Rows by series name, then by x key (``key_of(row)``; rows without one are left out)."""
    series = spec.get("series")
    groups: dict[str, dict[Any, dict[str, Any]]] = {}
    for row in result["rows"]:
        key = key_of(row)
        if key is not None:
            groups.setdefault(str(row.get(series, "all")) if series else "all", {})[key] = row
    return groups


def _figure(result: dict[str, Any], spec: dict[str, Any], groups: dict[str, Any]):
    """The figure, its axes, and whether a ratio panel against the baseline series goes beside the values."""
    plt, baseline = _pyplot(), result.get("baseline")
    ratio = bool(baseline and spec.get("series") and baseline in groups and len(groups) > 1)
    fig, axes = plt.subplots(1, 2 if ratio else 1, figsize=(12 if ratio else 7, 4.5), squeeze=False)
    return plt, fig, axes[0], ratio


def _label(name: str, y: str, ys: list[str]) -> str:
    if name == "all":  # no series: the y column names the bar or line
        return y
    return name if len(ys) == 1 else f"{name} {y}"


def _finish(plt, fig, axes, spec: dict[str, Any], result: dict[str, Any], count: int, path: Path) -> Path:
    ax = axes[0]
    ax.set_title(f"{spec.get('title', result['benchmark'])}\n{result['hardware']['label']}")
    for a in axes:
        a.grid(alpha=0.3, axis="y" if spec.get("kind") == "bar" else "both")
    if spec.get("log_y"):
        ax.set_yscale("log")
    crowded = count > 8  # a long legend goes beside the plot, not over the lines
    ax.legend(fontsize=7 if crowded else 8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if crowded else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_result(result: dict[str, Any], spec: dict[str, Any], path: Path) -> Path:
    """Absolute values of ``spec["y"]`` per series, plus ratios against the baseline: lines over a numeric x, or
    bars per category with ``"kind": "bar"``."""
    if spec.get("kind") == "bar":
        return plot_bars(result, spec, path)
    ys, x, baseline = _ys(spec), spec["x"], result.get("baseline")
    groups = _groups(result, spec, lambda row: row.get(x))
    plt, fig, axes, ratio = _figure(result, spec, groups)
    ax, styles = axes[0], ["-", "--", ":", "-."]
    colors = {name: f"C{n % 10}" for n, name in enumerate(groups)}  # one colour per series, one style per y
    for name, points in groups.items():
        xs = sorted(points)
        for i, y in enumerate(ys):
            vals = [points[v].get(y) for v in xs]
            ax.plot(
                [v for v, w in zip(xs, vals) if w is not None],
                [w for w in vals if w is not None],
                styles[i % len(styles)],
                marker="o",
                color=colors[name],
                label=_label(name, y, ys),
            )
    ax.set(xlabel=x, ylabel=", ".join(ys))
    if ratio:
        rax, base = axes[1], groups[baseline]
        for name, points in groups.items():
            xs = [v for v in sorted(points) if v in base]
            for i, y in enumerate(ys):
                pairs = [(v, points[v].get(y), base[v].get(y)) for v in xs]
                pairs = [(v, a / b) for v, a, b in pairs if a is not None and b]
                rax.plot(
                    [p[0] for p in pairs],
                    [p[1] for p in pairs],
                    styles[i % len(styles)],
                    marker="o",
                    color=colors[name],
                    label=_label(name, y, ys),
                )
        rax.axhline(1.0, color="grey", linewidth=0.8)
        rax.set(xlabel=x, ylabel=f"ratio vs {baseline}", title=f"ratio vs {baseline} (same run)")
        rax.legend(fontsize=8)
    if spec.get("log_x"):
        for a in axes:
            a.set_xscale("log", base=2)
    return _finish(plt, fig, axes, spec, result, len(groups) * len(ys), path)


def _category(spec: dict[str, Any]):
    """A row's bar-group label: the x column's value, or several columns' values joined."""
    columns = [spec["x"]] if isinstance(spec["x"], str) else list(spec["x"])

    def key(row: dict[str, Any]) -> str | None:
        values = [row.get(c) for c in columns]
        return None if any(v is None for v in values) else " / ".join(format_cell(v) for v in values)

    return key


def _bars(ax, groups: dict[str, dict[str, dict[str, Any]]], ys: list[str], categories: list[str], value) -> None:
    """One bar per (series, y) in each category, ``value(name, category, y)`` high (None: no bar), labelled."""
    bars = [(name, y) for name in groups for y in ys]
    width = 0.8 / len(bars)
    hatches = ["", "//", "..", "xx"]
    for j, (name, y) in enumerate(bars):
        points = [(i + (j - (len(bars) - 1) / 2) * width, value(name, c, y)) for i, c in enumerate(categories)]
        points = [(x, v) for x, v in points if v is not None]
        if not points:
            continue
        drawn = ax.bar(
            [p[0] for p in points],
            [p[1] for p in points],
            width,
            color=f"C{list(groups).index(name) % 10}",
            hatch=hatches[ys.index(y) % len(hatches)],
            edgecolor="white",
            label=_label(name, y, ys),
        )
        if len(bars) * len(categories) <= 30:
            ax.bar_label(drawn, labels=[format_cell(float(p[1])) for p in points], fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0, fontsize=8)


def plot_bars(result: dict[str, Any], spec: dict[str, Any], path: Path) -> Path:
    """Grouped bars: a group per category (x), a bar per series and y; ratios against the baseline series beside,
    on a log axis when they span more than 20x."""
    ys, baseline = _ys(spec), result.get("baseline")
    groups = _groups(result, spec, _category(spec))
    categories = list(dict.fromkeys(c for points in groups.values() for c in points))
    plt, fig, axes, ratio = _figure(result, spec, groups)
    _bars(axes[0], groups, ys, categories, lambda name, c, y: groups[name].get(c, {}).get(y))
    axes[0].set(ylabel=", ".join(ys))
    if ratio:
        base, others = groups[baseline], {k: v for k, v in groups.items() if k != baseline}

        def ratio_of(name: str, c: str, y: str) -> float | None:
            a, b = others[name].get(c, {}).get(y), base.get(c, {}).get(y)
            return a / b if a is not None and b else None

        _bars(axes[1], others, ys, categories, ratio_of)
        values = [r for n in others for c in categories for y in ys if (r := ratio_of(n, c, y))]
        if values and max(*values, 1.0) / min(*values, 1.0) > 20:  # the 1x line and every bar, readable
            axes[1].set_yscale("log")
        axes[1].axhline(1.0, color="grey", linewidth=0.8)
        axes[1].set(ylabel=f"ratio vs {baseline}", title=f"ratio vs {baseline} (same run)")
        axes[1].legend(fontsize=8)
    return _finish(plt, fig, axes, spec, result, len(groups) * len(ys), path)


def gpu_note(suite: dict[str, Any] | None) -> str | None:
    """Why there is no GPU utilisation to plot, or None when the suite sampled some."""
    if (suite or {}).get("gpu_series"):
        return None
    if suite is None:
        return "No GPU utilisation: no suite.json here (the results were not made by `recops bench`)."
    reasons = {r.get("gpu", {}).get("reason") for r in suite.get("runs", [])} - {None}
    return f"No GPU utilisation to show: {'; '.join(sorted(reasons)) or 'no GPU samples were taken'}."


def plot_gpu(suite: dict[str, Any], path: Path) -> Path:
    """GPU utilisation over the suite's run, one band per benchmark."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.5))
    series = suite["gpu_series"]
    for gpu in sorted({s["gpu"] for s in series}):
        pts = [s for s in series if s["gpu"] == gpu and s["util_pct"] is not None]
        ax.plot([s["t"] for s in pts], [s["util_pct"] for s in pts], label=f"GPU {gpu}")
    for i, run in enumerate(suite["runs"]):
        ax.axvspan(run["start_s"], run["start_s"] + run["seconds"], alpha=0.08, color=f"C{i}")
        ax.text(run["start_s"], 102, run["name"], fontsize=8)
    ax.set(ylim=(0, 110), xlabel="seconds since the suite started", ylabel="GPU utilisation %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"GPU utilisation (NVML, 0.5 s samples) — {(suite.get('hardware') or {}).get('label', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _load(results_dir: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]], dict[str, str]]:
    suite, results, broken = None, {}, {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            broken[path.stem] = f"unreadable JSON: {exc}"
            continue
        if path.stem == "suite":
            suite = data
        elif isinstance(data, dict) and "rows" in data and "hardware" in data:
            results[path.stem] = data
    return suite, results, broken


def _section(
    doc: Doc, name: str, result: dict[str, Any] | None, run: dict[str, Any] | None, results_dir: Path
) -> list[Path]:
    status = run["status"] if run else ("ok" if result else "not run")
    doc.heading(f"{name} — {status.upper() if status != 'ok' else 'ok'}")
    if run and run["status"] != "ok":
        doc.text(f"**{run['status'].upper()}**: {run['detail']} — `python {portable(' '.join(run['command']))}`")
        if run.get("log_tail"):
            doc.code(portable(run["log_tail"])[-1500:])
    if not result:
        if not run:
            doc.text("**NOT RUN**: no result JSON in this directory.")
        return []
    doc.text(
        f"Measured {result['date']} on **{result['hardware']['label']}** (load average "
        f"{result.get('load_avg_1m', '?')}). Baseline: `{result.get('baseline') or 'none'}`."
    )
    for label, key in (("Paths measured", "variants"), ("Errors", "errors")):
        if result.get(key):
            doc.text(f"{label}:\n" + "\n".join(f"- `{k}`: {v}" for k, v in result[key].items()))
    if result["rows"]:
        doc.table(result["rows"])
    else:
        doc.text("**NO ROWS**: the benchmark wrote an empty result.")
    plots = []
    for i, spec in enumerate(result.get("plots") or []):
        try:
            path = plot_result(result, spec, results_dir / f"{name}_{i}.png")
        except (KeyError, TypeError, ValueError) as exc:
            doc.text(f"**PLOT FAILED** ({spec.get('title', i)}): {exc}")
            continue
        doc.image(path, spec.get("title", name))
        plots.append(path)
    own = results_dir / f"{name}.png"  # a figure the benchmark drew itself
    if own.is_file():
        doc.image(own, f"{name} (drawn by bench/{name}.py)")
    return plots


def render(results_dir: Path | None = None) -> dict[str, Path]:
    """Write the Markdown and HTML reports (and PNGs) into ``results_dir``; returns their paths."""
    results_dir = Path(results_dir or default_results_dir())
    if not results_dir.is_dir():
        raise RecopsError(f"report: {results_dir} is not a directory; run `recops bench` first")
    suite, results, broken = _load(results_dir)
    runs = {r["name"]: r for r in (suite or {}).get("runs", [])}
    names = list(dict.fromkeys([*(b.name for b in BENCHMARKS), *runs, *results]))
    hw = (suite or next(iter(results.values()), {})).get("hardware", {}).get("label", "unknown hardware")
    doc = Doc()
    doc.heading("recops benchmark report", 1)
    doc.text(
        f"Hardware: **{hw}**. Suite run: {(suite or {}).get('date', 'none (results only)')}"
        f"{' (quick sizes)' if (suite or {}).get('quick') else ''}. Ratios compare variants measured in the same run."
    )
    summary = []
    for name in names:
        run, result = runs.get(name), results.get(name)
        gpu = (run or {}).get("gpu") or {}
        summary.append(
            {
                "benchmark": name,
                "status": run["status"] if run else ("ok (not in this suite run)" if result else "not run"),
                "detail": (run or {}).get("detail") or broken.get(name, ""),
                "seconds": (run or {}).get("seconds"),
                "measured": (result or {}).get("date"),
                "gpu util mean %": gpu.get("util_mean_pct"),
                "gpu util max %": gpu.get("util_max_pct"),
            }
        )
    doc.table(summary)
    doc.heading("GPU utilisation")
    note, gpu_png = gpu_note(suite), results_dir / GPU_PLOT
    plots = [] if note else [plot_gpu(suite, gpu_png)]
    if note:
        gpu_png.unlink(missing_ok=True)  # a figure from an earlier suite run would not match this report
        doc.text(note)
    else:
        doc.image(gpu_png, "GPU utilisation")
    for name in names:
        plots += _section(doc, name, results.get(name), runs.get(name), results_dir)
    md = results_dir / MARKDOWN
    write_text_atomic(md, doc.markdown())
    page = results_dir / HTML
    write_text_atomic(page, doc.html("recops benchmark report"))
    return {"markdown": md, "html": page, **{p.stem: p for p in plots}}


def main(argv: list[str] | None = None) -> int:
    args = (argv if argv is not None else sys.argv[1:]) or [str(default_results_dir())]
    try:
        paths = render(Path(args[0]))
    except RecopsError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
