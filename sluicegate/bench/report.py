"""The benchmark report: the JSON of DESIGN.md's CLI contract, and its terminal table.

Everything downstream (the table, the plot, ``--json``) reads the one dict
built here, so they always agree. Contract fields (DESIGN.md, "The CLI
contract"): one object per transport under ``transports``, with
``throughput_msgs_per_s``, ``baseline_msgs_per_s`` and ``latency_ms``
(``p50``, ``p99``, ``p999``) in transport mode, and ``step_msgs_per_s``,
``baseline_msgs_per_s`` (plus ``faust_msgs_per_s`` and
``faust_engine_msgs_per_s`` on Kafka) in step mode,
and ``tasks_per_s`` and ``latency_ms`` in pipeline mode, plus
``zero_latency_tasks_per_s`` and ``model_peak_in_flight`` with
``--model-latency`` (with ``model_latency_ratio``, their budget and the
instant run's own figures under ``zero_latency``).
Everything else is extra detail and may grow.

Percentiles are reported only where the sample supports them
(:data:`PERCENTILE_RULE`, every mode): p99 needs 1,000 measured samples,
p99.9 ten thousand; an unsupported one is ``null`` in the JSON, "n/a" in
the table, and the plotted curve stops before it.

``transports.nats`` is NATS JetStream (what the pipeline runs on); the raw
core NATS figures, for which sluicegate has no transport, ride along as
``transports.nats.core``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sluicegate.bench.step_mode import BUDGET_RATIO, FAUST_BUDGET_RATIO, FaustResult, StepResult
from sluicegate.bench.transport_mode import CaseResult, TransportRow

if TYPE_CHECKING:  # only their attributes are read: rendering needs no pipeline imports
    from sluicegate.bench.latency import Percentiles
    from sluicegate.bench.model_latency import ModelLatencyPair
    from sluicegate.bench.pipeline_mode import PipelineResult

Report = dict[str, Any]
REPORT_FORMAT = "sluicegate.bench/1"
CORE_NOTE = (
    "raw nats-py core publish/subscribe: no persistence and no acks, so sluicegate has no "
    "transport on it; the row shows the client's ceiling and is its own baseline"
)


def _ratio(ours: float, base: float) -> float | None:
    return round(ours / base, 3) if ours > 0 and base > 0 else None


def _case(case: CaseResult) -> dict[str, Any]:
    return {
        "client": case.label,
        "producer_msgs_per_s": round(case.producer_msgs_per_s, 1),
        "consumer_msgs_per_s": round(case.consumer_msgs_per_s, 1),
        "throughput_msgs_per_s": round(case.throughput_msgs_per_s, 1),
        "latency_ms": supported_latency(case.latency),
        "latency_curve_ms": [
            [p, ms] for p, ms in case.curve if percentile_supported(p, case.latency.count)
        ],
        "received": case.received,
        "duplicates": case.duplicates,
        "seconds": round(case.seconds, 3),
        "error": case.error,
    }


def transport_object(row: TransportRow) -> dict[str, Any]:
    """One transport's object: the contract fields from our side, beside its baseline."""
    head, base = row.headline, row.baseline
    obj: dict[str, Any] = {
        "title": row.title,
        "size_bytes": row.size_bytes,
        "messages": head.messages,
        "warmup_messages": head.warmup,
        "throughput_msgs_per_s": round(head.throughput_msgs_per_s, 1),
        "baseline_msgs_per_s": round(base.throughput_msgs_per_s, 1),
        "ratio": _ratio(head.throughput_msgs_per_s, base.throughput_msgs_per_s),
        "producer_msgs_per_s": round(head.producer_msgs_per_s, 1),
        "consumer_msgs_per_s": round(head.consumer_msgs_per_s, 1),
        "latency_ms": supported_latency(head.latency),
        "measured": _case(row.measured) if row.measured is not None else None,
        "baseline": _case(base),
        "error": row.measured.error if row.measured is not None else base.error,
    }
    if row.measured is None:
        obj["note"] = CORE_NOTE
    return obj


def transports_object(rows: Sequence[TransportRow]) -> dict[str, Any]:
    """``transports`` for one message size: ``nats`` (with ``core`` inside) and ``kafka``."""
    by_key = {row.key: transport_object(row) for row in rows}
    core = by_key.pop("nats_core", None)
    if core is not None:
        if "nats" in by_key:
            by_key["nats"]["core"] = core
        else:  # cannot happen with the plans we build, but never drop figures
            by_key["nats_core"] = core
    return by_key


def build_transport_report(rows: Sequence[TransportRow], meta: Mapping[str, Any]) -> Report:
    """The transport-mode report; with several sizes, ``transports`` holds the first."""
    sizes = list(dict.fromkeys(row.size_bytes for row in rows))
    per_size = [transports_object([r for r in rows if r.size_bytes == s]) for s in sizes]
    report: Report = {"format": REPORT_FORMAT, "mode": "transport", **meta}
    report["transports"] = per_size[0] if per_size else {}
    if len(sizes) > 1:
        report["sweep"] = [
            {"size_bytes": s, "transports": t} for s, t in zip(sizes, per_size, strict=True)
        ]
    return report


def step_object(result: StepResult) -> dict[str, Any]:
    ratio = result.ratio
    obj: dict[str, Any] = {
        "step_msgs_per_s": round(result.step_msgs_per_s, 1),
        "baseline_msgs_per_s": round(result.baseline_msgs_per_s, 1),
        "ratio": round(ratio, 3) if ratio is not None else None,
        "budget_ratio": BUDGET_RATIO,
        "within_budget": ratio is not None and ratio >= BUDGET_RATIO,
        "messages": result.messages,
        "warmup_messages": result.warmup,
        "batch_size": result.batch_size,
        "runner": result.runner_stats,
        "error": result.error,
    }
    faust = result.faust
    if faust is not None:
        versus = _ratio(result.step_msgs_per_s, faust.msgs_per_s)
        obj["faust_msgs_per_s"] = round(faust.msgs_per_s, 1) if faust.error is None else None
        obj["native_vs_faust"] = versus if faust.error is None else None
        obj["faust_budget_ratio"] = FAUST_BUDGET_RATIO
        obj["faust"] = _faust_detail(faust)
    engine = result.faust_engine
    if engine is not None:
        ok = engine.error is None
        obj["faust_engine_msgs_per_s"] = round(engine.msgs_per_s, 1) if ok else None
        obj["native_vs_faust_engine"] = (
            _ratio(result.step_msgs_per_s, engine.msgs_per_s) if ok else None
        )
        obj["faust_engine"] = _faust_detail(engine)
    return obj


def _faust_detail(faust: FaustResult) -> dict[str, Any]:
    return {
        "received": faust.received,
        "startup_s": round(faust.startup_s, 2),
        "settings": faust.settings,
        "error": faust.error,
    }


def build_step_report(results: Sequence[StepResult], meta: Mapping[str, Any]) -> Report:
    report: Report = {"format": REPORT_FORMAT, "mode": "step", **meta}
    report["transports"] = {r.key: step_object(r) for r in results}
    return report


# Samples a percentile needs beyond it: with one, pN is just the largest
# value but one (5,000 messages gave p90 = p99 = p99.9 = max); with ten it
# is an estimate of the tail, not of one outlier.
TAIL_SAMPLES = 10
PERCENTILE_RULE = (
    f"pN is reported when at least {TAIL_SAMPLES} / (1 - N/100) samples were measured "
    "(p90: 100, p99: 1,000, p99.9: 10,000), so that it rests on "
    f"{TAIL_SAMPLES} samples beyond it; null (n/a) otherwise"
)
_LATENCY_KEYS: Mapping[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def percentile_supported(percentile: float, count: int) -> bool:
    """Whether ``count`` samples put ``TAIL_SAMPLES`` beyond ``percentile`` (see the rule)."""
    # Rounded: 1 / (1 - 0.999) is 1000.0000000000009 in floating point.
    needed = math.ceil(round(TAIL_SAMPLES / (1.0 - percentile / 100.0), 6))
    return count > 0 and count >= needed


def supported_latency(latency: Percentiles) -> dict[str, float | int | None]:
    """``latency_ms`` with the percentiles the sample does not support set to None."""
    out: dict[str, float | int | None] = dict(latency.as_dict())
    for key, percentile in _LATENCY_KEYS.items():
        if not percentile_supported(percentile, latency.count):
            out[key] = None
    return out


def pipeline_object(result: PipelineResult) -> dict[str, Any]:
    """One transport's pipeline figures: the contract fields, then what explains them."""
    cpu_per_task, cores = result.worker_cpu_ms_per_task, result.worker_cores
    count = result.latency.count
    curve = [[p, ms] for p, ms in result.curve if percentile_supported(p, count)]
    model: dict[str, Any] | None = None
    if result.model_spec is not None:
        spec = result.model_spec
        model = {"median_ms": spec.median_ms, "sigma": spec.sigma, "seed": spec.seed}
        if result.model is not None:
            model.update(result.model.as_json())
    return {
        "tasks_per_s": round(result.tasks_per_s, 1),
        "latency_ms": supported_latency(result.latency),
        "mid_run_tasks_per_s": round(result.mid_run_tasks_per_s, 1),
        "offered_rate_per_s": result.offered_rate,
        "published_rate_per_s": round(result.publish_rate, 1),
        "publish_lag_ms": round(result.publish_lag_ms, 1),
        "sustained": result.sustained,
        "tasks": result.tasks,
        "warmup_tasks": result.warmup,
        "published": result.published,
        "completed": result.completed,
        "duplicates": result.duplicates,
        "statuses": dict(result.statuses),
        "results_rows": result.results_rows,
        "latency_curve_ms": curve,
        "sessions": result.sessions,
        "worker": result.worker,
        "topic_prefix": result.topic_prefix,
        "db_schema": result.db_schema,
        "worker_cpu_s": round(result.worker_cpu_s, 2) if result.worker_cpu_s is not None else None,
        "worker_cpu_ms_per_task": round(cpu_per_task, 2) if cpu_per_task is not None else None,
        "worker_cores": round(cores, 2) if cores is not None else None,
        "worker_rss_mb": result.rss.as_json() if result.rss is not None else None,
        "load_average": {"before": result.load_before, "after": result.load_after},
        "model": model,
        "primer_s": round(result.primer_s, 2),
        "seconds": round(result.seconds, 2),
        "error": result.error,
    }


def build_pipeline_report(results: Sequence[PipelineResult], meta: Mapping[str, Any]) -> Report:
    report: Report = {"format": REPORT_FORMAT, "mode": "pipeline", **meta}
    report["transports"] = {r.key: pipeline_object(r) for r in results}
    return report


def _within(ratio: float | None, budget: float | None) -> bool | None:
    """Whether ``ratio`` meets ``budget``; None when there is no budget."""
    return None if budget is None else ratio is not None and ratio >= budget


def model_latency_object(pair: ModelLatencyPair, budget: float | None) -> dict[str, Any]:
    """The slow-model run's figures, beside the instant run's tasks/s, their ratio and budget."""
    obj = pipeline_object(pair.model)
    ratio, mid = pair.ratio, pair.mid_run_ratio
    model = obj.get("model") or {}
    obj.update(
        {
            "zero_latency_tasks_per_s": round(pair.zero.tasks_per_s, 1),
            "model_peak_in_flight": model.get("peak_in_flight"),
            "model_latency_ratio": round(ratio, 3) if ratio is not None else None,
            "budget_ratio": budget,
            "within_budget": _within(ratio, budget),
            "mid_run_ratio": round(mid, 3) if mid is not None else None,
            "mid_run_within_budget": _within(mid, budget),
            "zero_latency_saturated": pair.zero_saturated,
            "zero_latency": pipeline_object(pair.zero),
        }
    )
    return obj


def build_model_latency_report(
    pairs: Sequence[ModelLatencyPair], meta: Mapping[str, Any], budget: float | None
) -> Report:
    """Pipeline mode with ``--model-latency``: one object per transport, as DESIGN.md has it."""
    report: Report = {"format": REPORT_FORMAT, "mode": "pipeline", **meta}
    report["transports"] = {p.key: model_latency_object(p, budget) for p in pairs}
    return report


# -- the table ----------------------------------------------------------------------


def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ms(latency: Mapping[str, Any], key: str, digits: int) -> str:
    """A latency cell: "n/a" where the sample cannot resolve the percentile (null)."""
    value = latency.get(key)
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _grid(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def fmt(row: Sequence[str]) -> str:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


_TRANSPORT_HEADER = (
    "transport / client",
    "size",
    "prod/s",
    "cons/s",
    "e2e/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "vs raw",
)


def _case_line(title: str, size: int, case: Mapping[str, Any], ratio: str) -> list[str]:
    lat = case["latency_ms"]
    return [
        title,
        str(size),
        _n(case["producer_msgs_per_s"]),
        _n(case["consumer_msgs_per_s"]),
        _n(case["throughput_msgs_per_s"]),
        *(_ms(lat, p, 2) for p in ("p50", "p90", "p99", "p999", "max")),
        ratio,
    ]


def _transport_lines(transports: Mapping[str, Any]) -> list[list[str]]:
    lines: list[list[str]] = []
    objects: list[Mapping[str, Any]] = []
    for obj in transports.values():
        if "core" in obj:
            objects.append(obj["core"])
        objects.append(obj)
    for obj in objects:
        size = obj["size_bytes"]
        base = obj["baseline"]
        lines.append(_case_line(f"{obj['title']}: {base['client']}", size, base, ""))
        if obj["measured"] is not None:
            ratio = f"{obj['ratio']:.2f}x" if obj["ratio"] is not None else "-"
            lines.append(
                _case_line(
                    f"{obj['title']}: {obj['measured']['client']}", size, obj["measured"], ratio
                )
            )
        if obj.get("error"):
            lines.append([f"  ! {obj['error']}", *[""] * (len(_TRANSPORT_HEADER) - 1)])
    return lines


_PIPELINE_HEADER = (
    "transport",
    "offered/s",
    "sent/s",
    "tasks/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "done",
    "cpu ms/task",
    "worker cores",
    "kept up",
)


def _rss_note(label: str, obj: Mapping[str, Any]) -> str | None:
    rss = obj.get("worker_rss_mb")
    if not rss:
        return None
    return (
        f"{label} worker RSS MB: start {rss['start']:.1f}, peak {rss['peak']:.1f}, "
        f"end {rss['end']:.1f} ({len(rss['samples'])} samples)"
    )


def _pipeline_table(report: Mapping[str, Any]) -> str:
    if report.get("settings", {}).get("model"):
        return _model_latency_table(report)
    lines: list[list[str]] = []
    notes: list[str] = []
    for key, obj in report["transports"].items():
        lat = obj["latency_ms"]
        cpu = obj.get("worker_cpu_ms_per_task")
        lines.append(
            [
                key,
                _n(obj["offered_rate_per_s"]),
                _n(obj["published_rate_per_s"]),
                _n(obj["tasks_per_s"]),
                *(_ms(lat, p, 1) for p in ("p50", "p90", "p99", "p999", "max")),
                f"{obj['completed']}/{obj['tasks']}",
                _n(cpu, 2),
                _n(obj.get("worker_cores"), 2),
                "yes" if obj["sustained"] else "NO",
            ]
        )
        # Below the grid, not in it: a long first cell would widen the first column.
        statuses = ", ".join(f"{name} {count}" for name, count in obj["statuses"].items())
        load = obj.get("load_average") or {}
        notes.append(
            f"{key} statuses: {statuses or '-'}; load average {_n(load.get('before'), 2)}"
            f" -> {_n(load.get('after'), 2)}"
        )
        rss = _rss_note(key, obj)
        if rss:
            notes.append(rss)
        if obj.get("error"):
            notes.append(f"{key} ! {obj['error']}")
    settings = report.get("settings", {})
    title = (
        f"pipeline benchmark: {settings.get('messages', '?')} tasks at "
        f"{settings.get('rate', 0):g}/s offered, worker: {settings.get('worker', '?')}"
    )
    return "\n".join([title, _grid(_PIPELINE_HEADER, lines), *notes])


_MODEL_RUN_HEADER = (
    "transport, model",
    "offered/s",
    "tasks/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "done",
    "cpu ms/task",
    "model calls",
    "peak in flight",
    "RSS MB start/peak/end",
)
_MODEL_RATIO_HEADER = (
    "transport",
    "instant tasks/s",
    "model tasks/s",
    "ratio",
    "budget",
    "verdict",
    "mid-run ratio",
    "verdict",
    "instant run",
)


def _model_run_line(label: str, obj: Mapping[str, Any]) -> list[str]:
    lat = obj["latency_ms"]
    model = obj.get("model") or {}
    rss = obj.get("worker_rss_mb")
    rss_text = f"{rss['start']:.0f}/{rss['peak']:.0f}/{rss['end']:.0f}" if rss else "-"
    return [
        label,
        _n(obj["offered_rate_per_s"]),
        _n(obj["tasks_per_s"]),
        *(_ms(lat, p, 1) for p in ("p50", "p99", "p999", "max")),
        f"{obj['completed']}/{obj['tasks']}",
        _n(obj.get("worker_cpu_ms_per_task"), 2),
        _n(model.get("requests")),
        _n(model.get("peak_in_flight")),
        rss_text,
    ]


def _verdict(obj: Mapping[str, Any], mid_run: bool = False) -> str:
    if obj.get("budget_ratio") is None:
        return "no budget"
    ratio, within = (
        ("mid_run_ratio", "mid_run_within_budget")
        if mid_run
        else ("model_latency_ratio", "within_budget")
    )
    if obj.get(ratio) is None:
        return "-"
    return "met" if obj.get(within) else "NOT MET"


def _model_latency_table(report: Mapping[str, Any]) -> str:
    settings = report.get("settings", {})
    spec = settings.get("model") or {}
    median = spec.get("median_ms", 0)
    runs: list[list[str]] = []
    ratios: list[list[str]] = []
    notes: list[str] = []
    for key, obj in report["transports"].items():
        zero = obj["zero_latency"]
        runs.append(_model_run_line(f"{key}, instant", zero))
        runs.append(_model_run_line(f"{key}, {median:g} ms", obj))
        ratio, budget = obj.get("model_latency_ratio"), obj.get("budget_ratio")
        mid = obj.get("mid_run_ratio")
        ratios.append(
            [
                key,
                _n(obj["zero_latency_tasks_per_s"]),
                _n(obj["tasks_per_s"]),
                f"{ratio:.2f}" if ratio is not None else "-",
                f">={budget:g}" if budget is not None else "-",
                _verdict(obj),
                f"{mid:.2f}" if mid is not None else "-",
                _verdict(obj, mid_run=True),
                "saturated" if obj.get("zero_latency_saturated") else "kept up",
            ]
        )
        for label, run in ((f"{key}, instant", zero), (f"{key}, {median:g} ms", obj)):
            statuses = ", ".join(f"{name} {count}" for name, count in run["statuses"].items())
            notes.append(f"{label} statuses: {statuses or '-'}")
            if run.get("error"):
                notes.append(f"{label} ! {run['error']}")
        if not obj.get("zero_latency_saturated") and zero.get("error") is None:
            notes.append(
                f"{key}: the instant run kept up with the offered rate, so the ratio is bounded "
                "by the offered load, not the pipeline's capacity: raise --rate"
            )
    title = (
        f"pipeline benchmark with a model: {settings.get('messages', '?')} tasks at "
        f"{settings.get('rate', 0):g}/s offered, log-normal model median {median:g} ms "
        f"(sigma {spec.get('sigma', 0):g}), {settings.get('sessions', '?')} sessions, "
        f"worker: {settings.get('worker', '?')}"
    )
    return "\n".join(
        [
            title,
            _grid(_MODEL_RUN_HEADER, runs),
            "",
            f"budget: tasks/s with the model over tasks/s with an instant model "
            f"({settings.get('budget_rule', '')}); mid-run: the same between the 10% and "
            "90% marks of the results, without the last tasks' model latency",
            _grid(_MODEL_RATIO_HEADER, ratios),
            *notes,
        ]
    )


def _ratio_text(value: float | None, present: bool) -> str:
    if value is not None:
        return f"{value:.2f}"
    return "-" if present else ""


def render_table(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table (one per mode)."""
    if report["mode"] == "pipeline":
        return _pipeline_table(report)
    if report["mode"] == "transport":
        runs = report.get("sweep") or [{"transports": report["transports"]}]
        lines = [line for run in runs for line in _transport_lines(run["transports"])]
        settings = report.get("settings", {})
        load = settings.get("load_model", "max_throughput")
        rate = settings.get("rate")
        title = f"transport benchmark: {settings.get('messages', '?')} messages, " + (
            f"fixed rate {rate:g}/s" if load == "fixed_rate" and rate else "max throughput"
        )
        return f"{title}\n{_grid(_TRANSPORT_HEADER, lines)}"
    header = (
        "transport",
        "bare loop/s",
        "step/s",
        "step/bare",
        "budget",
        "faust/s",
        "step/faust",
        "budget",
        "faust engine/s",
        "step/engine",
    )
    lines = []
    for key, obj in report["transports"].items():
        ratio = obj["ratio"]
        verdict = "ok" if obj["within_budget"] else "MISSED"
        faust = obj.get("faust_msgs_per_s")
        versus = obj.get("native_vs_faust")
        faust_verdict = ""
        if versus is not None:
            faust_verdict = "ok" if versus >= obj["faust_budget_ratio"] else "MISSED"
        lines.append(
            [
                key,
                _n(obj["baseline_msgs_per_s"]),
                _n(obj["step_msgs_per_s"]),
                f"{ratio:.2f}" if ratio is not None else "-",
                f">={obj['budget_ratio']:g} {verdict}",
                _n(faust) if "faust" in obj else "",
                f"{versus:.2f}" if versus is not None else ("-" if "faust" in obj else ""),
                f">={obj['faust_budget_ratio']:g} {faust_verdict}" if faust_verdict else "",
                _n(obj.get("faust_engine_msgs_per_s")) if "faust_engine" in obj else "",
                _ratio_text(obj.get("native_vs_faust_engine"), "faust_engine" in obj),
            ]
        )
        problems = [obj.get("error")]
        problems += [(obj.get(k) or {}).get("error") for k in ("faust", "faust_engine")]
        for problem in problems:
            if problem:
                lines.append([f"  ! {problem}", *[""] * (len(header) - 1)])
    messages = report.get("settings", {}).get("messages", "?")
    return f"step benchmark: {messages} messages\n{_grid(header, lines)}"
