"""A client for OpenAI-compatible chat completions endpoints, for many calls in flight.

The planner uses it (``agents.openai_planner``), and so can a user's own step::

    from sluicegate.agents.model_client import ModelCallError, ModelClient

    client = ModelClient("https://api.example/v1", api_key=key, step="summarise")

    async def process(self, event, ctx):
        try:
            result = await client.chat("gpt-4o-mini", [{"role": "user", "content": "..."}])
        except ModelCallError as exc:  # retries exhausted, or a reply retrying cannot fix
            ...
        ctx.detail["model"] = result.report.as_detail()

What it does about a busy worker and a flaky provider:

- **One pooled HTTP session per process** (per event loop), made on first use
  and shared by every client (:func:`shared_pool`), so calls reuse
  keep-alive connections instead of opening a session, a connection pool and
  a TLS handshake each. Close it once at shutdown with :meth:`ModelClient.aclose`
  or :func:`aclose_shared` (``sluice run`` does).
- **Per-attempt timeout** (``timeout``).
- **Retries** on 429, on 5xx, on dropped or refused connections and on
  timeouts, up to ``max_attempts`` attempts in all, with exponential backoff
  and full jitter (a uniform wait in ``[0, min(max_wait_s, backoff_s *
  2**(n-1))]``), so clients that failed together do not retry together. A
  ``Retry-After`` on 429 or 503 (seconds or an HTTP date) is waited for as
  given; one longer than ``max_wait_s`` ends the call at once, since retrying
  earlier than the server asked only burns attempts. Any other 4xx, a body
  that is not JSON or is too large are not retried: sending the same request
  again gives the same answer.
- **Per-endpoint limits** (:mod:`agents.model_limits`): at most
  ``concurrency`` requests in flight and, if ``rpm`` is set, at most that
  many requests a minute, shared by every client of the endpoint.
- **Usage**: each :class:`ChatResult` carries a :class:`CallReport` with the
  token usage the endpoint reported, the attempts and the latency; a
  :class:`ModelCallError` carries one too (attempts and latency, no usage).
  Both feed the ``sluice.model.*`` metrics (:mod:`agents.model_metrics`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Protocol

import aiohttp

from sluicegate.agents import model_metrics
from sluicegate.agents.model_limits import (
    Clock,
    LimitConfig,
    LimitRegistry,
    PerLoop,
    Sleep,
    shared_limits,
)
from sluicegate.streams.errors import SluiceError

DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_CONCURRENCY = 64
DEFAULT_BACKOFF_S = 0.5
DEFAULT_MAX_WAIT_S = 20.0
# A chat reply is kilobytes; one far larger is not a reply we can use.
MAX_REPLY_BYTES = 256 * 1024
# Statuses whose Retry-After says when to come back (RFC 9110, 10.2.3).
RETRY_AFTER_STATUSES = frozenset({429, 503})

log = logging.getLogger("sluicegate.model")


def endpoint(url: str) -> str:
    """Accept a base URL (``.../v1``) or the full chat completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


# --- results ----------------------------------------------------------------------------


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one reply, as the endpoint reported them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_reply(cls, reply: Any) -> Usage | None:
        """``reply["usage"]``, or None when the endpoint reported none."""
        usage = reply.get("usage") if isinstance(reply, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        total = _count(usage.get("total_tokens"))
        if prompt is None and completion is None and total is None:
            return None
        prompt, completion = prompt or 0, completion or 0
        return cls(prompt, completion, prompt + completion if total is None else total)


@dataclass(frozen=True, slots=True)
class CallReport:
    """What one call cost: the model, its usage, how many attempts, how long."""

    model: str | None
    usage: Usage | None
    attempts: int
    latency_s: float
    # Why the call failed (None when it succeeded), and its short type for metrics.
    error: str | None = None
    error_type: str | None = None

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    def as_detail(self) -> dict[str, Any]:
        """A compact JSON object for an audit row's detail."""
        detail: dict[str, Any] = {
            "model": self.model,
            "attempts": self.attempts,
            "latency_ms": round(self.latency_s * 1000),
        }
        if self.usage is not None:
            detail["prompt_tokens"] = self.usage.prompt_tokens
            detail["completion_tokens"] = self.usage.completion_tokens
            detail["total_tokens"] = self.usage.total_tokens
        if self.error is not None:
            detail["error"] = self.error
        return detail


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A successful reply: the parsed JSON body and the call's report."""

    body: Any
    report: CallReport

    @property
    def usage(self) -> Usage | None:
        return self.report.usage

    @property
    def content(self) -> str | None:
        """The first choice's message content, when it is text."""
        try:
            content = self.body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None


class ModelCallError(SluiceError):
    """The call failed for good: retries exhausted, or a failure retrying cannot fix.

    ``str(exc)`` is a one-line reason such as ``endpoint answered HTTP 503
    (after 4 attempts)``; ``kind`` is ``http``, ``timeout``, ``connection`` or
    ``reply`` (a body that is not JSON or is too large).
    """

    def __init__(self, message: str, *, kind: str, status: int | None, report: CallReport) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.report = report


class _AttemptFailed(Exception):
    """One attempt failed; whether to retry it, and after how long the server asked."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after

    @property
    def error_type(self) -> str:
        return str(self.status) if self.status is not None else self.kind


def retry_after_s(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (delay-seconds or an HTTP date) as seconds from ``now``.

    None when absent or unreadable; a date in the past is 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT; a zone-less one is read as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


# --- the pooled session -----------------------------------------------------------------


class SessionPool:
    """One ``aiohttp.ClientSession`` per event loop, opened on first use."""

    def __init__(self) -> None:
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop()
        # How many sessions this pool has opened (tests check reuse with it).
        self.opened = 0

    def session(self) -> aiohttp.ClientSession:
        """The running loop's session (call from a coroutine)."""
        session = self._sessions.get(self._open)
        if session.closed:  # closed behind the pool's back: open a fresh one
            session = self._open()
            self._sessions.replace_current(session)
        return session

    def _open(self) -> aiohttp.ClientSession:
        self.opened += 1
        # No connector-wide limit: the per-endpoint semaphores are the bound,
        # and aiohttp's default of 100 would be a second, hidden one.
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def aclose(self) -> None:
        """Close the running loop's session; the next call opens a new one."""
        session = self._sessions.pop_current()
        if session is not None and not session.closed:
            await session.close()


_shared_pool = SessionPool()


def shared_pool() -> SessionPool:
    """The process-wide pool every client uses unless given another."""
    return _shared_pool


async def aclose_shared() -> None:
    """Close the process-wide session of the running loop (at worker shutdown)."""
    await _shared_pool.aclose()


# --- the client -------------------------------------------------------------------------


class ChatClient(Protocol):
    """What a step needs from a model client: :class:`ModelClient` is one, a test's stub another."""

    async def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> ChatResult: ...


class ModelClient:
    """Chat completions against one endpoint; see the module docstring for the behaviour.

    ``step`` labels this client's metrics (``sluice.step``). ``pool`` and
    ``limits`` default to the process-wide ones; ``sleep``, ``clock``,
    ``wall_clock`` and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        concurrency: int = DEFAULT_CONCURRENCY,
        rpm: float | None = None,
        backoff_s: float = DEFAULT_BACKOFF_S,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_reply_bytes: int = MAX_REPLY_BYTES,
        step: str = "model",
        pool: SessionPool | None = None,
        limits: LimitRegistry | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        if backoff_s < 0 or max_wait_s < 0:
            raise ValueError("backoff_s and max_wait_s must not be negative")
        self.url = endpoint(url)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.max_reply_bytes = max_reply_bytes
        self.step = step
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._pool = pool or shared_pool()
        self._limits = limits or shared_limits()
        # Raises at construction, not mid-call, when another client of this
        # endpoint declared different limits.
        self._limits.register(self.url, LimitConfig(concurrency, rpm))
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._sleep = sleep
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng

    @property
    def limits(self) -> LimitConfig:
        config = self._limits.config(self.url)
        assert config is not None  # registered in __init__, never removed
        return config

    async def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> ChatResult:
        """``complete`` with a body made of ``model``, ``messages`` and any other parameters."""
        return await self.complete({"model": model, "messages": list(messages), **params})

    async def complete(self, body: Mapping[str, Any]) -> ChatResult:
        """POST ``body`` (retrying as the module says); the reply, or :class:`ModelCallError`."""
        limits = self._limits.limits(self.url)
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with limits.slot():
                    reply = await self._attempt(body)
            except _AttemptFailed as failure:
                wait = self._wait_before_retry(failure, attempt)
                if wait is None:
                    raise self._give_up(body, failure, attempt, started) from None
                model_metrics.record_retry(self.step, failure.error_type)
                log.debug("%s: %s; retry %d in %.2fs", self.url, failure, attempt, wait)
                await self._sleep(wait)
                continue
            report = CallReport(
                model=_model_of(reply, body),
                usage=Usage.from_reply(reply),
                attempts=attempt,
                latency_s=self._clock() - started,
            )
            model_metrics.record_call(self.step, report)
            return ChatResult(reply, report)

    async def aclose(self) -> None:
        """Close the pooled session this client uses (by default the process-wide one)."""
        await self._pool.aclose()

    def _wait_before_retry(self, failure: _AttemptFailed, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if not failure.retryable or attempt >= self.max_attempts:
            return None
        if failure.retry_after is not None:
            return failure.retry_after if failure.retry_after <= self.max_wait_s else None
        return self._rng() * min(self.max_wait_s, self.backoff_s * 2.0 ** (attempt - 1))

    def _give_up(
        self, body: Mapping[str, Any], failure: _AttemptFailed, attempt: int, started: float
    ) -> ModelCallError:
        message = failure.message
        if failure.retryable and failure.retry_after is not None and attempt < self.max_attempts:
            message += (
                f" (it asked for a retry in {failure.retry_after:g}s, "
                f"over the {self.max_wait_s:g}s limit)"
            )
        elif attempt > 1:
            message += f" (after {attempt} attempts)"
        report = CallReport(
            model=_model_of(None, body),
            usage=None,
            attempts=attempt,
            latency_s=self._clock() - started,
            error=message,
            error_type=failure.error_type,
        )
        model_metrics.record_call(self.step, report)
        return ModelCallError(message, kind=failure.kind, status=failure.status, report=report)

    async def _attempt(self, body: Mapping[str, Any]) -> Any:
        session = self._pool.session()
        try:
            async with session.post(
                self.url, json=dict(body), headers=self._headers, timeout=self._timeout
            ) as response:
                if response.status != 200:
                    raise self._http_failure(response)
                raw = await self._read(response)
        except TimeoutError:
            message = f"no reply within {self.timeout:g}s"
            raise _AttemptFailed("timeout", message, retryable=True) from None
        except (aiohttp.InvalidURL, aiohttp.ClientSSLError) as exc:
            # A bad URL or certificate stays bad on the next attempt.
            message = f"request failed: {type(exc).__name__}"
            raise _AttemptFailed("connection", message, retryable=False) from None
        except aiohttp.ClientError as exc:  # refused, reset, dropped mid-reply
            message = f"request failed: {type(exc).__name__}"
            raise _AttemptFailed("connection", message, retryable=True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _AttemptFailed("reply", "response body is not JSON", retryable=False) from None

    def _http_failure(self, response: aiohttp.ClientResponse) -> _AttemptFailed:
        status = response.status
        retry_after = (
            retry_after_s(response.headers.get("Retry-After"), self._wall())
            if status in RETRY_AFTER_STATUSES
            else None
        )
        return _AttemptFailed(
            "http",
            f"endpoint answered HTTP {status}",
            retryable=status == 429 or 500 <= status <= 599,
            status=status,
            retry_after=retry_after,
        )

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise _AttemptFailed("reply", "reply is too large", retryable=False)
            chunks.append(chunk)
        return b"".join(chunks)


def _model_of(reply: Any, body: Mapping[str, Any]) -> str | None:
    """The model that answered (the reply says), else the one asked for."""
    if isinstance(reply, dict) and isinstance(reply.get("model"), str):
        model: str = reply["model"]
        return model
    asked = body.get("model")
    return asked if isinstance(asked, str) else None
