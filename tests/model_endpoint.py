"""A scripted chat completions endpoint on loopback, and a clock the tests drive by hand.

The endpoint is a real aiohttp server: the client under test opens real TCP
connections, gets real status codes and headers, and sees real dropped
connections, so retries, pooling and limits are tested as they run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def completion(content: str = "hi", *, usage: dict[str, int] | None = USAGE) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "model": "tiny-1",
        "choices": [{"message": {"role": "assistant", "content": content}}],
    }
    if usage is not None:
        reply["usage"] = usage
    return reply


@dataclass
class Reply:
    """What the endpoint does with one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None  # default: ``completion()``
    raw: bytes | None = None  # a body sent as it is, instead of JSON
    drop: bool = False  # close the connection without answering
    hang: bool = False  # never answer (until the test ends)


@dataclass
class Endpoint:
    url: str = ""
    # Replies for the next requests, in order; after them, ``default``.
    script: list[Reply] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    requests: int = 0
    bodies: list[Any] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    # Client (host, port) pairs seen: one per TCP connection the client opened.
    peers: set[tuple[str, int]] = field(default_factory=set)
    # While cleared, every request waits here: lets a test hold requests in flight.
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.bodies.append(await request.json())
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.peers.add((peer[0], peer[1]))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.gate.wait()
            reply = self.script.pop(0) if self.script else self.default
            if reply.hang:
                await self.released.wait()
            if reply.drop:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)  # never sent: the connection is gone
            if reply.raw is not None:
                return web.Response(status=reply.status, body=reply.raw, headers=reply.headers)
            body = completion() if reply.json is None else reply.json
            return web.json_response(body, status=reply.status, headers=reply.headers)
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def serve() -> AsyncIterator[Endpoint]:
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", endpoint.handle)
    # Handlers that hang are released at the end, so shutdown never waits on them.
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    endpoint.url = f"http://{host}:{port}/v1"
    try:
        yield endpoint
    finally:
        endpoint.released.set()
        endpoint.gate.set()
        await runner.cleanup()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for ``condition``; a synchronisation helper, not a timing assertion."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def settle() -> None:
    """Let everything runnable run (requests in flight reach the server, waiters park)."""
    for _ in range(20):
        await asyncio.sleep(0.005)


class ManualClock:
    """``clock()`` and ``sleep()`` on a time that moves only when the test calls ``advance``."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    @property
    def sleeping(self) -> int:
        return sum(1 for _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self.now + 1e-9]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now + 1e-9]
        for _, future in due:
            if not future.done():
                future.set_result(None)


class RecordingSleep:
    """A ``sleep`` that records how long it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)
