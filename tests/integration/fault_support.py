"""The fault tests' common parts: a Postgres the test can take away, a paced publisher, a worker.

- :class:`PgProxy` stands between a worker and the shared Postgres (which
  other people use: it is never stopped). ``down()`` drops every connection
  and refuses new ones, as a stopped server does; ``silent()`` accepts
  connections and never answers, as a hung server or a black-holed network
  does; ``up()`` forwards again.
- :func:`publish_paced` publishes tasks at a steady rate and retries a batch
  that fails (a broker restarting) with the same events, so the same ids:
  what lands twice is absorbed downstream.
- :class:`Worker` is ``sluice run`` as a subprocess, logging to a file.
- :class:`OwnNats` is a nats-server of the test's own, to stop and start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sluicegate import localstack
from sluicegate.localstack._process import stop_pid
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.sinks.db import connect
from sluicegate.sinks.queries import verify_chains
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.transport import OutMessage
from tests.integration.pipeline_support import env_for, results_count, scalar_rows


@dataclass
class OwnNats:
    """A nats-server with file storage that the test may stop and start again."""

    port: int
    home: Path
    service: localstack.RunningService | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.service = localstack.start_nats(port=self.port, home=self.home)

    def stop(self, sig: signal.Signals) -> None:
        service, self.service = self.service, None
        if service is not None and service.pid is not None:
            stop_pid(service.pid, sig, name="nats")
            if service.pidfile is not None:
                service.pidfile.unlink(missing_ok=True)


class PgProxy:
    """A TCP proxy to Postgres that the test can take down, silence and bring back."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._mode = "up"

    @property
    def url_suffix(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self._stop_listening()
        self._drop_all()

    def up(self) -> None:
        self._mode = "up"

    async def down(self) -> None:
        """Like a stopped server: live connections drop, new ones are refused."""
        self._mode = "down"
        await self._stop_listening()
        self._drop_all()

    async def back_up(self) -> None:
        self._mode = "up"
        await self.start(self.port)

    def silent(self) -> None:
        """New connections are accepted and never answered (live ones keep working)."""
        self._mode = "silent"

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _drop_all(self) -> None:
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._pipes.add(writer)
        if self._mode == "silent":
            # Read and drop whatever the client says; never answer.
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._pipes.discard(writer)
            writer.transport.abort()


@contextlib.asynccontextmanager
async def pg_proxy(database_url: str) -> AsyncIterator[PgProxy]:
    """A started :class:`PgProxy` to ``database_url``'s server, closed on exit."""
    from urllib.parse import urlsplit

    parts = urlsplit(database_url)
    proxy = PgProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def through(settings: Settings, proxy: PgProxy) -> Settings:
    """The same settings with the database reached through ``proxy``."""
    return settings.model_copy(
        update={"database_url": via_proxy(settings.resolved_database_url(), proxy)}
    )


def via_proxy(database_url: str, proxy: PgProxy) -> str:
    """``database_url`` with its host and port replaced by the proxy's."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{proxy.url_suffix}" if auth else proxy.url_suffix
    return urlunsplit(parts._replace(netloc=netloc))


async def publish_paced(
    settings: Settings, events: Sequence[Event], *, per_second: float, chunk: int = 20
) -> int:
    """Publish ``events`` at about ``per_second``; a failed chunk is retried (same ids).

    Returns how many chunks needed a retry. Gives up (AssertionError) when a
    chunk keeps failing for two minutes.
    """
    transport = make_transport(settings)
    await transport.connect()
    retried = 0
    try:
        await transport.ensure_topics(["tasks"])
        started = time.monotonic()
        for i in range(0, len(events), chunk):
            batch = [
                OutMessage("tasks", encode(e), key=e.key, headers=headers_for(e))
                for e in events[i : i + chunk]
            ]
            deadline = time.monotonic() + 120
            while True:
                try:
                    await transport.publish_batch(batch)
                    break
                except Exception as exc:
                    retried += 1
                    assert time.monotonic() < deadline, f"publishing kept failing: {exc!r}"
                    await asyncio.sleep(0.5)
            # Pace by the schedule, not by sleeps: catch up after a stall.
            ahead = started + (i + chunk) / per_second - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await transport.close()
    return retried


class Worker:
    """``sluice run`` as a subprocess with the test's settings (plus ``env``), logged to a file."""

    def __init__(self, settings: Settings, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.log = log
        full = {**os.environ, **env_for(settings), **(env or {})}
        argv = [sys.executable, "-m", "sluicegate", "run", "--log-level", "WARNING"]
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(argv, env=full, stdout=sink, stderr=sink)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}: {self.tail()}")

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or None if still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return None

    async def terminate(self, timeout_s: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after ``timeout_s``, seconds taken)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await self.wait_exit(timeout_s)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def wait_results(
    settings: Settings, n: int, *, timeout_s: float, worker: Worker | None = None
) -> int:
    """Poll until the results table holds ``n`` rows (or the time is up); the count reached."""
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        if worker is not None:
            worker.check_alive()
        count = await results_count(settings)
        if count >= n:
            return count
        await asyncio.sleep(0.2)
    return count


async def readyz_until(
    port: int, wanted: Callable[[int, str], bool], *, timeout_s: float = 30.0
) -> tuple[int, str]:
    """Poll the worker's ``/readyz`` until ``wanted(status, body)``; (status, body) then."""
    import urllib.error
    import urllib.request

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, repr(exc)

    deadline = time.monotonic() + timeout_s
    seen = (0, "")
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(get)
        if wanted(*seen):
            return seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"/readyz never as wanted within {timeout_s:g}s; last: {seen}")


async def execute_sql(settings: Settings, statement: str) -> None:
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        await conn.execute(statement)  # type: ignore[arg-type]
    finally:
        await conn.close()


async def assert_exactly_once(settings: Settings, task_ids: Sequence[str]) -> None:
    """One result per task and none else, no audit row written twice, every chain intact."""
    rows = await scalar_rows(settings, "SELECT task_id FROM results")
    stored = sorted(str(r[0]) for r in rows)
    missing = set(task_ids) - set(stored)
    assert not missing, f"{len(missing)} tasks without a result, e.g. {sorted(missing)[:3]}"
    assert stored == sorted(task_ids), "results for tasks that were not published"
    duplicated = await scalar_rows(
        settings,
        "SELECT step, event_id, kind, count(*) FROM audit_log "
        "GROUP BY step, event_id, kind HAVING count(*) > 1 LIMIT 5",
    )
    assert duplicated == [], f"audit rows written twice: {duplicated}"
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        report = await verify_chains(conn)
    finally:
        await conn.close()
    assert not report.breaks, f"audit chains broken: {report.breaks}"
