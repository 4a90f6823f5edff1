"""Running the gateway under uvicorn: start the gateway, then listen; stop in that order reversed.

Uvicorn because it is the reference ASGI server, maintained beside Starlette
by the same people, and with its ``standard`` extra it parses HTTP with
httptools and runs on uvloop, which is most of the throughput a single
process gets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import uvicorn

from sluicegate.agents.graph import Pipeline
from sluicegate.gateway.app import Gateway, create_app
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.errors import SluiceError

log = logging.getLogger("sluicegate.gateway")


def build(settings: Settings, *, pipeline: Pipeline | None = None, topic: str = "tasks") -> Gateway:
    return Gateway(settings, make_transport(settings), pipeline=pipeline, topic=topic)


class ListenError(SluiceError, OSError):
    """The address to serve on cannot be bound (in use, not this host's, no permission)."""


class _Server(uvicorn.Server):
    """Uvicorn's server without its own signal handling: the caller decides when to stop.

    Uvicorn would re-raise SIGTERM once it has shut down, ending the process
    before the gateway closes its connections; ``sluice serve`` sets
    ``should_exit`` from its own handlers instead, and tests from their code.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Listening:
    server: uvicorn.Server
    port: int
    task: asyncio.Task[None]

    def stop(self) -> None:
        self.server.should_exit = True

    async def wait(self) -> None:
        """Until the server stops (``stop``, or it failed)."""
        await asyncio.shield(self.task)


@asynccontextmanager
async def listening(
    gateway: Gateway, host: str, port: int, *, log_level: str = "warning"
) -> AsyncIterator[Listening]:
    """Serve ``gateway`` (started here) on host:port until the block ends.

    Port 0 picks a free one (tests). The socket is bound before the gateway
    starts, so a port in use is reported before any connection is made.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = int(sock.getsockname()[1])
    try:
        await gateway.start()
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        create_app(gateway),
        log_level=log_level,
        access_log=False,  # a line per request would cost more than the request
        lifespan="off",  # the gateway is started above, before listening
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # Uvicorn sets ``started`` and has no event for it: look until it is.
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # the error that stopped it
            raise RuntimeError("the HTTP server stopped while starting")
        yield Listening(server, bound, task)
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            await gateway.close()
            sock.close()
