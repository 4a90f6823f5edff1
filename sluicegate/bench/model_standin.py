"""A loopback stand-in for an OpenAI-compatible model: real HTTP, a chosen latency, a valid plan.

``sluice bench --mode pipeline --model-latency MS`` needs a model that
answers like a hosted one (an HTTP ``POST /v1/chat/completions``, a reply
after some hundreds of milliseconds, sometimes much later) but costs
nothing, never rate-limits and says what it saw. This module is that model:

- a real aiohttp server on ``127.0.0.1`` and a free port, so the planner's
  HTTP client, its connections and its timeouts are all exercised;
- each request is answered after a log-normal delay with the given median
  (``median_ms``; ``sigma`` the spread of the log: 0.5 puts p99 at about
  3.2 times the median, the long tail hosted models show); ``median_ms=0`` is
  an instant model. Delays come from a ``random.Random(seed)`` in arrival
  order, so a run's delays are reproducible as a multiset;
- the reply is a chat completion whose ``choices[0].message.content`` is a
  JSON array of tool calls that ``agents.openai_planner.parse_plan``
  accepts, derived from the last user message by the rule-based planner's
  rules (``agents.rule_planner``), with a ``usage`` object. So the generated
  load (``sluicegate.samples.generate``) gets the same plans, and the
  policy gate the same mix of allowed, denied and redacted actions, as
  with the rule-based planner; "again" re-plans the previous prompt from
  the "Earlier requests" message the planner sends;
- it counts requests and the number in flight (now and at peak), keeps the
  realised delays in an HDR histogram, and records each request (arrival
  and finish on ``time.monotonic``, its messages, ``model`` and ``user``),
  so a test can check that one session's calls came one at a time and in
  order (:func:`key_order_violations`) and what history each call carried.

In process: ``ModelStandin(...)``, ``await start()``, ``url``, ``await
stop()``; the clock and the sleep are injectable, so tests read the delay
distribution without waiting for it. As a child process (what the
pipeline bench uses, so its own event loop stays free to stamp results)::

    python -m sluicegate.bench.model_standin --port 0 --median-ms 200

prints one JSON line ``{"url": ..., "port": ..., "pid": ...}`` on stdout
once it listens, and serves until SIGTERM or SIGINT (or until its parent
goes away). :class:`StandinProcess` starts and stops one. Over HTTP:
``GET /stats`` (requests, in flight, peak, delays), ``GET /requests``
(the records kept; none by default in a child, see ``--keep-requests``),
``POST /stats/reset`` (zero the counters and the records), ``GET
/v1/models``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sluicegate.agents.rule_planner import plan_request, requests
from sluicegate.agents.schemas import MAX_ACTIONS, ToolCall
from sluicegate.bench.latency import LatencyRecorder

DEFAULT_SIGMA = 0.5
DEFAULT_SEED = 7
MODEL_NAME = "sluice-standin"
HOST = "127.0.0.1"
# The "Earlier requests" message of agents.openai_planner.request_body.
_EARLIER = "Earlier requests:"
# agents.rule_planner's "again" rule: re-plan the session's previous prompt.
_AGAIN = re.compile(r"^(?:again|repeat(?:\s+that)?|do\s+it\s+again)[.!]?$", re.I)
_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
_ORPHAN_CHECK_S = 1.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


class LogNormalDelay:
    """Delays in seconds, log-normal with median ``median_ms`` and log-spread ``sigma``.

    ``median * exp(sigma * Z)``, ``Z`` standard normal: half the delays fall
    below the median, and the mean is ``median * exp(sigma² / 2)``.
    """

    def __init__(self, median_ms: float, sigma: float = DEFAULT_SIGMA, seed: int = DEFAULT_SEED):
        if median_ms < 0 or sigma < 0:
            raise ValueError("median_ms and sigma must not be negative")
        self.median_s = median_ms / 1000.0
        self.sigma = sigma
        self._rng = random.Random(seed)

    @property
    def mean_s(self) -> float:
        return self.median_s * math.exp(self.sigma**2 / 2)

    def next(self) -> float:
        if self.median_s == 0:
            return 0.0
        return self.median_s * math.exp(self.sigma * self._rng.gauss(0.0, 1.0))


@dataclass(slots=True)
class RequestRecord:
    """One chat completions request as the stand-in saw it (times: ``time.monotonic`` s)."""

    index: int
    arrived: float
    messages: list[dict[str, Any]]
    model: str | None = None
    user: str | None = None
    delay_s: float = 0.0
    finished: float | None = None

    @property
    def prompt(self) -> str:
        """The last user message: the task's prompt."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
        return ""

    @property
    def history(self) -> list[str]:
        """The earlier prompts the planner sent as context, oldest first."""
        return earlier_prompts(self.messages)

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "arrived": self.arrived,
            "finished": self.finished,
            "delay_s": self.delay_s,
            "model": self.model,
            "user": self.user,
            "messages": self.messages,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RequestRecord:
        return cls(
            index=int(obj["index"]),
            arrived=float(obj["arrived"]),
            messages=list(obj.get("messages") or []),
            model=obj.get("model"),
            user=obj.get("user"),
            delay_s=float(obj.get("delay_s") or 0.0),
            finished=obj.get("finished"),
        )


@dataclass(frozen=True, slots=True)
class StandinStats:
    """What the stand-in counted; ``delay_ms`` are the delays it drew (p50, p99, max, count)."""

    median_ms: float
    sigma: float
    requests: int
    in_flight: int
    peak_in_flight: int
    errors: int
    delay_ms: dict[str, float | int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "sigma": self.sigma,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "errors": self.errors,
            "delay_ms": dict(self.delay_ms),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StandinStats:
        return cls(
            median_ms=float(obj["median_ms"]),
            sigma=float(obj["sigma"]),
            requests=int(obj["requests"]),
            in_flight=int(obj["in_flight"]),
            peak_in_flight=int(obj["peak_in_flight"]),
            errors=int(obj["errors"]),
            delay_ms=dict(obj.get("delay_ms") or {}),
        )


def earlier_prompts(messages: Sequence[dict[str, Any]]) -> list[str]:
    """The prompts listed in the planner's "Earlier requests:" message, if there is one."""
    for message in messages:
        content = message.get("content")
        user = message.get("role") == "user" and isinstance(content, str)
        if user and str(content).startswith(_EARLIER):
            lines = str(content)[len(_EARLIER) :].splitlines()
            return [line[2:] for line in lines if line.startswith("- ")]
    return []


def plan_for(prompt: str, history: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The plan the rule-based planner would make for ``prompt``, as JSON-ready tool calls."""
    calls: list[ToolCall] = []
    for request in requests(prompt):
        if _AGAIN.match(request) and history:
            previous = requests(history[-1])
            calls.extend(plan_request(r) for r in previous if not _AGAIN.match(r))
            continue
        calls.append(plan_request(request))
    if not calls:
        calls.append(ToolCall(tool="echo", args={"text": prompt or "(empty prompt)"}))
    return [{"tool": c.tool, "args": c.args} for c in calls[:MAX_ACTIONS]]


def _tokens(text: str) -> int:
    """A rough token count (four characters a token), for the ``usage`` object."""
    return max(1, len(text) // 4)


def completion(
    index: int, model: str, content: str, prompt_text: str, created: int
) -> dict[str, Any]:
    """A chat completions reply carrying ``content``."""
    prompt_tokens, completion_tokens = _tokens(prompt_text), _tokens(content)
    return {
        "id": f"chatcmpl-standin-{index}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.json_response(body, status=status)


class ModelStandin:
    """The stand-in server; ``start()`` binds ``127.0.0.1`` (port 0: a free one)."""

    def __init__(
        self,
        median_ms: float = 0.0,
        *,
        sigma: float = DEFAULT_SIGMA,
        seed: int = DEFAULT_SEED,
        port: int = 0,
        keep_requests: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``keep_requests``: how many request records to keep (the latest; None: all)."""
        self.median_ms = median_ms
        self.sigma = sigma
        self.seed = seed
        self._delays = LogNormalDelay(median_ms, sigma, seed)
        self._port = port
        self._keep = keep_requests
        self._clock = clock
        self._sleep = sleep
        self.records: deque[RequestRecord] = deque(maxlen=keep_requests)
        self.count = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.errors = 0
        self._delay_hist = LatencyRecorder()
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/chat/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/stats/reset", self._reset)
        app.router.add_get("/requests", self._requests)
        return app

    async def start(self) -> None:
        # A short shutdown: calls still sleeping at stop() are dropped, not waited for.
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        site = web.TCPSite(runner, HOST, self._port, backlog=1024, reuse_address=True)
        await site.start()
        self._runner = runner
        addresses = runner.addresses  # (host, port) of each listening socket
        self._bound_port = int(addresses[0][1]) if addresses else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ModelStandin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("the stand-in is not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """The base URL, as ``SLUICE_LLM_URL`` takes it (``.../v1``)."""
        return f"http://{HOST}:{self.port}/v1"

    # -- what it counted ------------------------------------------------------------------

    def stats(self) -> StandinStats:
        p = self._delay_hist.percentiles()
        return StandinStats(
            median_ms=self.median_ms,
            sigma=self.sigma,
            requests=self.count,
            in_flight=self.in_flight,
            peak_in_flight=self.peak_in_flight,
            errors=self.errors,
            delay_ms={"p50": p.p50, "p99": p.p99, "max": p.max, "count": p.count},
        )

    def reset(self) -> None:
        """Zero the counters and drop the records (requests in flight stay counted)."""
        self.records.clear()
        self.count = self.errors = 0
        self.peak_in_flight = self.in_flight
        self._delay_hist = LatencyRecorder()

    # -- handlers -----------------------------------------------------------------------

    async def _complete(self, request: web.Request) -> web.Response:
        arrived = self._clock()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._answer(request, arrived)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, arrived: float) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
        except ValueError:
            self.errors += 1
            return _error(400, "the request body is not JSON")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self.errors += 1
            return _error(400, "'messages' must be a list of objects")
        index = self.count
        self.count += 1
        model = body.get("model") if isinstance(body.get("model"), str) else None
        user = body.get("user") if isinstance(body.get("user"), str) else None
        record = RequestRecord(index, arrived, messages, model=model, user=user)
        if self._keep is None or self._keep > 0:
            self.records.append(record)
        delay = self._delays.next()
        record.delay_s = delay
        self._delay_hist.record_ns(int(delay * 1e9))
        content = json.dumps(plan_for(record.prompt, record.history))
        prompt_text = " ".join(str(m.get("content", "")) for m in messages)
        if delay > 0:
            await self._sleep(delay)
        reply = completion(index, model or MODEL_NAME, content, prompt_text, int(time.time()))
        record.finished = self._clock()
        return web.json_response(reply)

    async def _models(self, _: web.Request) -> web.Response:
        model = {"id": MODEL_NAME, "object": "model", "owned_by": "sluicegate"}
        return web.json_response({"object": "list", "data": [model]})

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats().as_json())

    async def _reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.stats().as_json())

    async def _requests(self, _: web.Request) -> web.Response:
        return web.json_response([r.as_json() for r in self.records])


def key_order_violations(
    records: Iterable[RequestRecord], key_of: Callable[[RequestRecord], Hashable | None]
) -> list[tuple[RequestRecord, RequestRecord]]:
    """Pairs of one key's requests that overlapped (the later arrived before the earlier finished).

    One (tenant, session) key is processed strictly one event at a time, so
    its model calls must not overlap. ``key_of`` maps a record to its key
    (e.g. through its prompt); records with key ``None`` are ignored.
    """
    by_key: dict[Hashable, list[RequestRecord]] = {}
    for record in records:
        key = key_of(record)
        if key is not None:
            by_key.setdefault(key, []).append(record)
    bad: list[tuple[RequestRecord, RequestRecord]] = []
    for group in by_key.values():
        group.sort(key=lambda r: (r.arrived, r.index))
        for earlier, later in itertools.pairwise(group):
            if earlier.finished is None or later.arrived < earlier.finished:
                bad.append((earlier, later))
    return bad


# -- as a child process -----------------------------------------------------------------


class StandinProcess:
    """``python -m sluicegate.bench.model_standin`` as a child, read through HTTP."""

    def __init__(
        self,
        median_ms: float,
        *,
        sigma: float = DEFAULT_SIGMA,
        seed: int = DEFAULT_SEED,
        keep_requests: int = 0,
    ) -> None:
        self.median_ms = median_ms
        self.args = [
            "--port",
            "0",
            "--median-ms",
            repr(float(median_ms)),
            "--sigma",
            repr(float(sigma)),
            "--seed",
            str(seed),
            "--keep-requests",
            str(keep_requests),
        ]
        self._proc: asyncio.subprocess.Process | None = None
        self._url: str | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the stand-in is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        fd, name = tempfile.mkstemp(prefix="sluice-model-standin-", suffix=".log")
        os.close(fd)
        self._log = Path(name)
        with self._log.open("wb") as sink:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sluicegate.bench.model_standin",
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=sink,
            )
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), _READY_TIMEOUT_S)
            self._url = str(json.loads(line)["url"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            await self.stop()
            raise RuntimeError(f"the model stand-in did not start: {self._log_tail()}") from None

    async def _get(self, path: str, method: str = "GET") -> Any:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, self.url.removesuffix("/v1") + path) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def stats(self) -> StandinStats:
        return StandinStats.from_json(await self._get("/stats"))

    async def reset(self) -> StandinStats:
        return StandinStats.from_json(await self._get("/stats/reset", "POST"))

    async def records(self) -> list[RequestRecord]:
        return [RequestRecord.from_json(obj) for obj in await self._get("/requests")]

    def failure(self) -> str | None:
        proc = self._proc
        if proc is None or proc.returncode is None:
            return None
        return f"the model stand-in exited with {proc.returncode}: {self._log_tail()}"

    def _log_tail(self, lines: int = 6) -> str:
        try:
            text = self._log.read_text(errors="replace").strip() if self._log else ""
        except OSError:
            return "(no log)"
        return " | ".join(text.splitlines()[-lines:]) or "(empty log)"

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.unlink()


async def serve(args: argparse.Namespace) -> None:
    """Run a stand-in until SIGTERM or SIGINT, or until the parent process is gone."""
    keep = None if args.keep_requests < 0 else args.keep_requests
    standin = ModelStandin(
        args.median_ms, sigma=args.sigma, seed=args.seed, port=args.port, keep_requests=keep
    )
    await standin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = {"url": standin.url, "port": standin.port, "pid": os.getpid()}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    parent = os.getppid()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _ORPHAN_CHECK_S)
            if os.getppid() != parent:  # the parent died: nobody will stop us
                break
    finally:
        await standin.stop()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate.bench.model_standin",
        description="A loopback OpenAI-compatible model stand-in with log-normal latency.",
    )
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--median-ms", type=float, default=0.0, help="0: answer at once")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--keep-requests",
        type=int,
        default=0,
        help="request records kept for GET /requests (the latest N; -1: all)",
    )
    args = parser.parse_args(argv)
    if args.median_ms < 0 or args.sigma < 0:
        parser.error("--median-ms and --sigma must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__: Sequence[str] = (
    "LogNormalDelay",
    "ModelStandin",
    "RequestRecord",
    "StandinProcess",
    "StandinStats",
    "key_order_violations",
    "plan_for",
)
