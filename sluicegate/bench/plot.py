"""The benchmark plot: a PNG drawn from the report dict (matplotlib, Agg backend).

The title says what was measured (messages, size, load model or offered
rate); latency axes are logarithmic with plain millisecond labels; a
curve stops at the last percentile its sample supports (see ``report``),
and an absent bar is marked "n/a" rather than drawn as zero.

Transport mode: latency percentile curves (ours solid, raw client dashed,
one colour per transport) on a "nines" axis, and end-to-end throughput bars
of ours beside the raw client. Step mode: bars of the bare loop, the step on
our runtime and Faust, per transport. Pipeline mode: the end-to-end latency
percentile curve per transport, completed tasks/s beside the offered rate,
and the worker's RSS over the run. With ``--model-latency``: the curves and
RSS of both runs (solid: the slow model, dashed: the instant one), and
tasks/s of both runs per transport with their ratio and the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot's import

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter


def _plain_ms(ax: Any) -> None:
    """Plain millisecond numbers on a log latency axis (0.5, 1, 10, 200), not 10^x."""
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _na_bars(ax: Any, xs: list[float], values: list[float | None]) -> None:
    """Say "n/a" where a bar is absent: an empty slot must not read as zero."""
    for x, value in zip(xs, values, strict=True):
        if not value:
            ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize="small", color="0.4")


def title_of(report: Mapping[str, Any]) -> str:
    """What was measured: mode, messages, size and load model (or offered rate), date."""
    settings = report.get("settings", {})
    parts = [f"sluice bench --mode {report['mode']}"]
    messages, size = settings.get("messages"), settings.get("size_bytes")
    if messages is not None:
        unit = "tasks" if report["mode"] == "pipeline" else "messages"
        parts.append(f"{messages:,} {unit}" + (f" of {size:,} B" if size else ""))
    if settings.get("load_model"):
        rate = settings.get("rate")
        parts.append(f"load {settings['load_model']}" + (f" at {rate:g}/s" if rate else ""))
    elif settings.get("rate"):
        parts.append(f"offered {settings['rate']:g}/s")
    model = settings.get("model")
    if isinstance(model, Mapping) and model.get("median_ms") is not None:
        parts.append(f"model {model['median_ms']:g} ms median")
    if report.get("date"):
        parts.append(str(report["date"]))
    return ", ".join(parts)


def _nines(percentile: float) -> float:
    """50 → 0.3, 90 → 1, 99 → 2, 99.9 → 3: spreads the tail out evenly."""
    return -math.log10(max(1e-6, 1.0 - percentile / 100.0))


def _rows(transports: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows: list[Mapping[str, Any]] = []
    for obj in transports.values():
        if "core" in obj:
            rows.append(obj["core"])
        rows.append(obj)
    return rows


def _transport_figure(report: Mapping[str, Any]) -> Any:
    rows = _rows(report["transports"])
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
    for i, row in enumerate(rows):
        colour = f"C{i}"
        for case, style, suffix in (
            (row["measured"], "-", "sluicegate"),
            (row["baseline"], "--", "raw"),
        ):
            if case is None or not case["latency_curve_ms"]:
                continue
            xs = [_nines(p) for p, _ in case["latency_curve_ms"]]
            ys = [max(ms, 1e-3) for _, ms in case["latency_curve_ms"]]
            curves.plot(xs, ys, style, color=colour, marker=".", label=f"{row['title']} ({suffix})")
    curves.set_xticks([_nines(p) for p in ticks], [f"p{p:g}" for p in ticks])
    curves.set_yscale("log")
    _plain_ms(curves)
    curves.set_ylabel("end-to-end latency (ms)")
    curves.set_title("Latency percentiles")
    curves.grid(True, which="both", alpha=0.3)
    curves.legend(fontsize="small")

    width = 0.38
    xs = list(range(len(rows)))
    ours = [row["throughput_msgs_per_s"] if row["measured"] else 0.0 for row in rows]
    raw = [row["baseline_msgs_per_s"] for row in rows]
    bars.bar([x - width / 2 for x in xs], ours, width, label="sluicegate transport")
    bars.bar([x + width / 2 for x in xs], raw, width, label="raw client")
    _na_bars(bars, [x - width / 2 for x in xs], ours)
    _na_bars(bars, [x + width / 2 for x in xs], raw)
    bars.set_xticks(xs, [row["title"] for row in rows])
    bars.set_ylabel("messages/s (end to end)")
    bars.set_title("Throughput beside the raw client")
    bars.legend(fontsize="small")
    return fig


def _step_figure(report: Mapping[str, Any]) -> Any:
    keys = list(report["transports"])
    fig, ax = plt.subplots(figsize=(8, 5))
    series = (
        ("bare loop", "baseline_msgs_per_s"),
        ("step (StepRunner + Postgres)", "step_msgs_per_s"),
        ("Faust agent", "faust_msgs_per_s"),
        ("our Faust engine", "faust_engine_msgs_per_s"),
    )
    width = 0.2
    for i, (label, field) in enumerate(series):
        values = [report["transports"][k].get(field) or 0.0 for k in keys]
        at = [x + (i - 1.5) * width for x in range(len(keys))]
        ax.bar(at, values, width, label=label)
        _na_bars(ax, at, values)
    ax.set_xticks(list(range(len(keys))), keys)
    ax.set_ylabel("messages/s")
    ax.set_title("One stateful step beside a bare consume→produce loop")
    ax.legend(fontsize="small")
    return fig


def _latency_curve(ax: Any, obj: Mapping[str, Any], style: str, colour: str, label: str) -> None:
    points = obj["latency_curve_ms"]
    if not points:
        return
    xs = [_nines(p) for p, _ in points]
    ys = [max(ms, 1e-3) for _, ms in points]
    ax.plot(xs, ys, style, color=colour, marker=".", label=label)


def _latency_axes(ax: Any) -> None:
    ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
    ax.set_xticks([_nines(p) for p in ticks], [f"p{p:g}" for p in ticks])
    ax.set_yscale("log")
    _plain_ms(ax)
    ax.set_ylabel("task publish → final result (ms)")
    ax.set_title("End-to-end latency percentiles")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _rss_line(ax: Any, obj: Mapping[str, Any], style: str, colour: str, label: str) -> None:
    rss = obj.get("worker_rss_mb")
    if not rss or not rss["samples"]:
        return
    ts = [t for t, _ in rss["samples"]]
    mbs = [mb for _, mb in rss["samples"]]
    ax.plot(ts, mbs, style, color=colour, label=label)


def _rss_axes(ax: Any) -> None:
    ax.set_xlabel("seconds from the first scheduled task")
    ax.set_ylabel("worker RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Worker resident memory over the run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _pipeline_figure(report: Mapping[str, Any]) -> Any:
    transports = report["transports"]
    if report.get("settings", {}).get("model"):
        return _model_latency_figure(report)
    with_rss = any(obj.get("worker_rss_mb") for obj in transports.values())
    fig, axes = plt.subplots(1, 3 if with_rss else 2, figsize=(19 if with_rss else 13, 5))
    curves, bars = axes[0], axes[1]
    for i, (key, obj) in enumerate(transports.items()):
        _latency_curve(curves, obj, "-", f"C{i}", key)
        if with_rss:
            _rss_line(axes[2], obj, "-", f"C{i}", key)
    _latency_axes(curves)
    if with_rss:
        _rss_axes(axes[2])

    keys = list(transports)
    width = 0.38
    xs = list(range(len(keys)))
    offered = [transports[k]["offered_rate_per_s"] for k in keys]
    done = [transports[k]["tasks_per_s"] for k in keys]
    bars.bar([x - width / 2 for x in xs], offered, width, label="offered")
    bars.bar([x + width / 2 for x in xs], done, width, label="completed (steady window)")
    bars.set_xticks(xs, keys)
    bars.set_ylabel("tasks/s")
    bars.set_title("Completed tasks beside the offered rate")
    bars.legend(fontsize="small")
    return fig


def _model_latency_figure(report: Mapping[str, Any]) -> Any:
    transports = report["transports"]
    median = report["settings"]["model"].get("median_ms", 0)
    fig, (curves, bars, memory) = plt.subplots(1, 3, figsize=(19, 5))
    for i, (key, obj) in enumerate(transports.items()):
        colour = f"C{i}"
        runs = ((obj, "-", f"{median:g} ms model"), (obj["zero_latency"], "--", "instant model"))
        for run, style, what in runs:
            _latency_curve(curves, run, style, colour, f"{key}, {what}")
            _rss_line(memory, run, style, colour, f"{key}, {what}")
    _latency_axes(curves)
    _rss_axes(memory)

    keys = list(transports)
    width = 0.38
    xs = list(range(len(keys)))
    zero = [transports[k]["zero_latency_tasks_per_s"] for k in keys]
    slow = [transports[k]["tasks_per_s"] for k in keys]
    bars.bar([x - width / 2 for x in xs], zero, width, label="instant model")
    bars.bar([x + width / 2 for x in xs], slow, width, label=f"{median:g} ms model")
    for x, key in zip(xs, keys, strict=True):
        obj = transports[key]
        ratio, budget = obj.get("model_latency_ratio"), obj.get("budget_ratio")
        text = f"{ratio:.2f}" if ratio is not None else "-"
        if budget is not None:
            text += f" (budget {budget:g})"
        top = max(obj["zero_latency_tasks_per_s"], obj["tasks_per_s"])
        bars.annotate(text, (x, top), ha="center", va="bottom", fontsize="small")
    bars.set_xticks(xs, keys)
    bars.set_ylabel("tasks/s (steady window)")
    bars.set_title("Tasks/s with the model beside an instant model")
    bars.legend(fontsize="small", loc="lower right")
    return fig


def write_plot(report: Mapping[str, Any], path: Path) -> None:
    """Draw the report's figure into ``path`` (PNG)."""
    figures = {"transport": _transport_figure, "pipeline": _pipeline_figure}
    fig = figures.get(report["mode"], _step_figure)(report)
    try:
        fig.suptitle(title_of(report), fontsize="medium")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
