"""OpenTelemetry instruments of model calls, behind ``streams.metrics``' process-wide switch.

Metrics are off until the application turns them on (``streams.metrics.configure``
or ``use_provider``); until then every ``record_*`` call returns at once and
the SDK is never touched. Once on, the instruments are made from the same
meter provider as the step metrics, and made again if it is replaced.

- ``sluice.model.tokens`` (counter, ``{token}``): tokens the model reported,
  with ``sluice.step`` and ``gen_ai.token.type`` = ``input`` (prompt) or
  ``output`` (completion), as the OpenTelemetry GenAI conventions name them;
- ``sluice.model.call.duration`` (histogram, seconds): one model call from
  the first attempt to the last answer, backoff included, with
  ``sluice.step`` and, on failure, ``error.type``;
- ``sluice.model.retries`` (counter, ``{retry}``): attempts retried, with
  ``sluice.step`` and ``error.type`` (the HTTP status, ``timeout`` or
  ``connection``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sluicegate.streams import metrics

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram

    from sluicegate.agents.model_client import CallReport

STEP = metrics.STEP
TOKEN_TYPE = "gen_ai.token.type"
ERROR_TYPE = "error.type"

# Seconds: model calls take from tens of milliseconds to a minute.
CALL_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


class _Instruments:
    __slots__ = ("duration", "provider", "retries", "tokens")

    def __init__(self, provider: Any) -> None:
        meter = provider.get_meter("sluicegate.model")
        self.provider = provider
        self.tokens: Counter = meter.create_counter(
            "sluice.model.tokens", unit="{token}", description="Tokens reported by the model"
        )
        self.duration: Histogram = meter.create_histogram(
            "sluice.model.call.duration",
            unit="s",
            description="One model call, all attempts and backoff included",
            explicit_bucket_boundaries_advisory=CALL_SECONDS_BUCKETS,
        )
        self.retries: Counter = meter.create_counter(
            "sluice.model.retries", unit="{retry}", description="Model call attempts retried"
        )


_cache: list[_Instruments] = []


def _instruments() -> _Instruments | None:
    if not metrics.enabled():
        return None
    # streams.metrics has no public accessor for its provider yet; reading its
    # switch here keeps one provider for all of sluicegate's metrics without
    # editing that module. A ``provider()`` function there should replace this.
    provider = getattr(getattr(metrics, "_state", None), "provider", None)
    if provider is None:
        return None
    if not _cache or _cache[0].provider is not provider:
        _cache[:] = [_Instruments(provider)]
    return _cache[0]


def record_call(step: str, report: CallReport) -> None:
    """Count one finished call: its duration and, when the model said, its tokens."""
    instruments = _instruments()
    if instruments is None:
        return
    attrs: dict[str, str] = {STEP: step}
    if report.error_type is not None:
        attrs[ERROR_TYPE] = report.error_type
    instruments.duration.record(report.latency_s, attrs)
    usage = report.usage
    if usage is not None:
        if usage.prompt_tokens:
            instruments.tokens.add(usage.prompt_tokens, {STEP: step, TOKEN_TYPE: "input"})
        if usage.completion_tokens:
            instruments.tokens.add(usage.completion_tokens, {STEP: step, TOKEN_TYPE: "output"})


def record_retry(step: str, error_type: str) -> None:
    """Count one attempt that is about to be retried."""
    instruments = _instruments()
    if instruments is not None:
        instruments.retries.add(1, {STEP: step, ERROR_TYPE: error_type})
