"""The engine behind ``sluice publish``: stream JSON lines into a topic, validated and paced.

This module owns reading the input without loading it into memory, turning
each line into an encoded event through :class:`~streams.publisher.Publisher`
(which fills in ``id``, ``time`` and ``source`` and validates the envelope and
the ``data`` schema), batching, rate pacing and the counts. The command
(``sluicegate.cli_publish``) owns flags, progress display and exit codes.

Input is read by a background thread in chunks of whatever is available, so a
slow upstream (``producer | sluice publish -``) has its events sent as soon as
they arrive instead of waiting for a full batch, and the event loop stays free
to answer broker pings while the input is quiet.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import orjson

from sluicegate.agents.graph import Pipeline
from sluicegate.agents.schemas import TASK_SUBMITTED
from sluicegate.agents.topics import TASKS
from sluicegate.pipeline import task_registry
from sluicegate.streams.codec import (
    DEFAULT_MAX_BYTES,
    REASON_INVALID_JSON,
    REASON_INVALID_UTF8,
    REASON_TOO_LARGE,
    DecodeError,
)
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import OutMessage, Transport

DEFAULT_BATCH = 500
READ_CHUNK = 64 * 1024
# Chunks read ahead of the publisher: bounds memory to about this many READ_CHUNKs.
READ_AHEAD = 16
# A line this much over the event size limit can never become a valid event,
# so it is dropped while reading instead of being held in memory whole.
LINE_LIMIT_FACTOR = 4
# When the input pauses, wait this long for more before sending a partial batch.
LINGER_S = 0.005

# What a source yields: (line number, the line) where the line is raw JSON
# bytes, an already-parsed object (``--generate``), or None for a line that
# was too long to keep.
Payload = bytes | Mapping[str, Any] | None
Item = tuple[int, Payload]


# --- reporting ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    """One input line that was not published, and why."""

    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.detail}"


@dataclass(slots=True)
class PublishStats:
    """Running counts; the command reads them even after an interrupt or a broker failure."""

    published: int = 0
    rejected: int = 0
    # The line --strict stopped at, if it did.
    stopped_at: int | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        elapsed = self.elapsed_s
        return self.published / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        return (
            f"published {self.published}, rejected {self.rejected}, "
            f"{self.elapsed_s:.2f} s, {self.rate:,.0f} events/s"
        )


# --- turning a line into a message -------------------------------------------------


def to_message(publisher: Publisher, item: Payload) -> OutMessage:
    """Parse, complete, validate and encode one input item; ``DecodeError`` says what is wrong."""
    if item is None:
        raise DecodeError(
            REASON_TOO_LARGE,
            f"line is over {publisher.max_bytes * LINE_LIMIT_FACTOR} bytes "
            f"(events may be at most {publisher.max_bytes})",
        )
    if isinstance(item, bytes):
        try:
            raw = orjson.loads(item)
        except orjson.JSONDecodeError as exc:
            reason = REASON_INVALID_UTF8 if "UTF-8" in str(exc) else REASON_INVALID_JSON
            # orjson counts lines within the text it parsed, always "line 1"
            # here; next to the input's line number that would only confuse.
            detail = str(exc).replace("line 1 column", "column")
            raise DecodeError(reason, detail) from None
    else:
        raw = item
    # prepare() rejects non-objects, fills id/time/source, checks envelope and data;
    # encode() runs the before_send hook and enforces the size limit.
    return publisher.encode(publisher.prepare(raw))


# --- pacing -------------------------------------------------------------------------


class Pacer:
    """Spaces sends so that on average ``rate`` events per second go out.

    Each send is scheduled: the batch starting at event ``k`` goes out at
    ``start + k / rate``, so sleep overshoot does not accumulate and the rate
    is accurate over seconds whatever the batch size. If sending falls behind
    (a slow broker or a slow input) by more than ``max_lag_s``, the schedule
    moves up instead of bursting to catch up.
    """

    def __init__(
        self,
        rate: float,
        *,
        max_lag_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._sleep = sleep
        self._due: float | None = None

    async def wait(self) -> None:
        """Sleep until the next send is due (reserves nothing)."""
        now = self._clock()
        if self._due is None or self._due < now - self.max_lag_s:
            self._due = now if self._due is None else now - self.max_lag_s
        if self._due > now:
            await self._sleep(self._due - now)

    def spend(self, n: int) -> None:
        """Account for ``n`` events sent: the next send is due ``n / rate`` seconds later."""
        if self._due is None:
            self._due = self._clock()
        self._due += n / self.rate

    async def take(self, n: int) -> None:
        """Wait until ``n`` more events may be sent, and reserve them."""
        await self.wait()
        self.spend(n)


def paced_batch_size(rate: float | None, batch_size: int = DEFAULT_BATCH) -> int:
    """Batch size for a rate: about 20 sends per second, so pacing stays smooth."""
    if rate is None:
        return batch_size
    return max(1, min(batch_size, int(rate / 20)))


# --- sources ------------------------------------------------------------------------


class LineReader:
    """Numbered lines of a file (or stdin), read by a daemon thread into a bounded queue.

    Line numbers count every line (blank ones too), so they match what an
    editor shows. Lines longer than ``line_limit`` come through as ``None``.
    The thread opens and closes the file itself, so a file descriptor is never
    closed (and reused) under a read that is still running.
    """

    def __init__(self, path: str | None, *, line_limit: int, chunk: int = READ_CHUNK) -> None:
        self.path = path  # None: stdin
        self.line_limit = line_limit
        self.chunk = chunk
        self._queue: asyncio.Queue[list[Item] | BaseException | None] = asyncio.Queue()
        # Backpressure: the thread takes a slot per chunk, the consumer gives it back.
        self._slots = threading.Semaphore(READ_AHEAD)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sluice-publish-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def empty(self) -> bool:
        return self._queue.empty()

    async def get(self, timeout: float | None = None) -> list[Item] | None:
        """The next chunk of lines; None at end of input. Raises what reading raised."""
        if timeout is None:
            got = await self._queue.get()
        else:
            got = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(got, BaseException):
            raise got
        if got is not None:
            self._slots.release()
        return got

    def _send(self, item: list[Item] | BaseException | None) -> bool:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the publisher is gone
            return False
        return True

    def _run(self) -> None:
        try:
            fd = sys.stdin.buffer.fileno() if self.path is None else os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            self._send(exc)
            return
        try:
            self._pump(fd)
        finally:
            if self.path is not None:
                os.close(fd)

    def _pump(self, fd: int) -> None:
        try:
            for lines in self._chunks(fd):
                # Wait for room, but notice when the publisher gave up.
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if self._stop.is_set() or not self._send(lines):
                    return
        except Exception as exc:  # OSError mostly; whatever it is, the publisher must hear of it
            self._send(exc)
            return
        self._send(None)

    def _chunks(self, fd: int) -> Iterable[list[Item]]:
        lineno = 0
        partial = bytearray()
        overlong = False  # the current line passed the limit: drop its bytes
        while not self._stop.is_set():
            data = os.read(fd, self.chunk)
            if not data:
                break
            lines: list[Item] = []
            start = 0
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                lineno += 1
                if overlong:
                    lines.append((lineno, None))
                elif partial:
                    partial += data[start:end]
                    too_long = len(partial) > self.line_limit
                    lines.append((lineno, None if too_long else bytes(partial)))
                else:
                    too_long = end - start > self.line_limit
                    lines.append((lineno, None if too_long else data[start:end]))
                partial.clear()
                overlong = False
                start = end + 1
            if not overlong:
                partial += data[start:]
                if len(partial) > self.line_limit:
                    overlong = True
                    partial.clear()
            if lines:
                yield lines
        if overlong or partial:  # a last line without a newline
            yield [(lineno + 1, None if overlong else bytes(partial))]


async def generated_chunks(
    objects: Iterable[Mapping[str, Any]], chunk: int = DEFAULT_BATCH
) -> AsyncGenerator[list[Item] | None, None]:
    """``--generate``: synthetic objects, numbered like lines."""
    lines: list[Item] = []
    for i, obj in enumerate(objects, start=1):
        lines.append((i, obj))
        if len(lines) >= chunk:
            yield lines
            lines = []
            await asyncio.sleep(0)  # let acks and pings through between chunks
    if lines:
        yield lines


async def reader_chunks(reader: LineReader) -> AsyncGenerator[list[Item] | None, None]:
    """Chunks from ``reader``; a ``None`` chunk means "input is quiet now: flush"."""
    reader.start()
    try:
        while True:
            if reader.empty():
                try:
                    got = await reader.get(LINGER_S)
                except TimeoutError:
                    yield None
                    got = await reader.get()
            else:
                got = await reader.get()
            if got is None:
                return
            yield got
    finally:
        reader.stop()


# --- the publishing loop ------------------------------------------------------------


class Sender:
    """Batches messages and sends them on the transport's pipelined path, paced."""

    def __init__(
        self,
        transport: Transport,
        stats: PublishStats,
        *,
        batch_size: int,
        pacer: Pacer | None,
        on_sent: Callable[[int], None],
    ) -> None:
        self.transport = transport
        self.stats = stats
        self.batch_size = batch_size
        self.pacer = pacer
        self.on_sent = on_sent
        self.pending: list[OutMessage] = []

    async def ready(self) -> None:
        """Wait, when pacing, until a new batch may start.

        Called before an item is prepared, so the ``time`` filled in is the
        time it is sent, not the time it was read.
        """
        if self.pacer is not None and not self.pending:
            await self.pacer.wait()

    async def add(self, message: OutMessage) -> None:
        self.pending.append(message)
        if len(self.pending) >= self.batch_size:
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        if self.pacer is not None:
            await self.pacer.take(len(batch))  # no wait left when ready() was awaited
        await self.transport.publish_batch(batch)
        self.stats.published += len(batch)
        self.on_sent(len(batch))


async def publish_stream(
    publisher: Publisher,
    chunks: AsyncGenerator[list[Item] | None, None],
    stats: PublishStats,
    *,
    rate: float | None = None,
    strict: bool = False,
    on_reject: Callable[[Rejection], None] = lambda r: None,
    on_sent: Callable[[int], None] = lambda n: None,
) -> PublishStats:
    """Publish every valid item of ``chunks``; report and skip the others.

    With ``strict`` the first invalid item stops it: the valid items before it
    are sent (so ``stats.published`` says exactly what went out), nothing
    after it is. Broker failures propagate; ``stats`` then holds what was
    acknowledged before the failure.
    """
    sender = Sender(
        publisher.transport,
        stats,
        batch_size=paced_batch_size(rate, publisher.batch_size),
        pacer=Pacer(rate) if rate is not None else None,
        on_sent=on_sent,
    )
    # Elapsed and events/s measure publishing, not connecting.
    stats.started = time.monotonic()
    try:
        # aclosing: stopping early (--strict) stops the reader thread now, not at exit.
        async with aclosing(chunks):
            async for lines in chunks:
                if lines is None:  # the input paused: don't hold events back
                    await sender.flush()
                    continue
                for lineno, item in lines:
                    if isinstance(item, bytes) and not item.strip():
                        continue  # blank lines are allowed and skipped
                    await sender.ready()
                    try:
                        message = to_message(publisher, item)
                    except DecodeError as exc:
                        stats.rejected += 1
                        on_reject(Rejection(lineno, exc.reason, _one_line(exc.detail)))
                        if strict:
                            stats.stopped_at = lineno
                            await sender.flush()
                            return stats
                        continue
                    await sender.add(message)
        await sender.flush()
        return stats
    finally:
        stats.finished = time.monotonic()


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def line_limit(max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    return max_bytes * LINE_LIMIT_FACTOR


def make_publisher(
    transport: Transport,
    *,
    topic: str,
    batch_size: int = DEFAULT_BATCH,
    pipeline: Pipeline | None = None,
) -> Publisher:
    """A publisher for ``topic``, validating against the pipeline's upstream schemas.

    On an upstream topic of ``pipeline`` the data must fit the schema of its
    type, and ``type`` defaults to the topic's only type if it has one.
    Other topics carry the steps' own event types, so only the envelope is
    checked there and ``type`` must be given. Without ``pipeline``: the
    reference pipeline's ``tasks`` and ``task.submitted``.
    """
    if pipeline is not None:
        default_type, registry = pipeline.default_type(topic), pipeline.registry(topic)
    elif topic == TASKS:
        default_type, registry = TASK_SUBMITTED, task_registry()
    else:
        default_type, registry = None, None
    return Publisher(
        transport,
        topic=topic,
        source="sluicegate/publish",
        default_type=default_type,
        registry=registry,
        batch_size=batch_size,
        # No before_send: with tracing on (runtime.configure_telemetry), the
        # Publisher applies streams.tracing.publish_hook itself, so each event
        # starts its task's trace and carries it as traceparent.
    )


async def run_publish(
    transport: Transport,
    chunks: AsyncGenerator[list[Item] | None, None],
    stats: PublishStats,
    *,
    topic: str,
    rate: float | None = None,
    strict: bool = False,
    on_reject: Callable[[Rejection], None] = lambda r: None,
    on_sent: Callable[[int], None] = lambda n: None,
    pipeline: Pipeline | None = None,
) -> PublishStats:
    """Connect, make sure ``topic`` exists, publish ``chunks`` into it, close."""
    await transport.connect()
    try:
        # Upstream may publish before any worker has run (and created the topics).
        await transport.ensure_topics([topic])
        publisher = make_publisher(transport, topic=topic, pipeline=pipeline)
        return await publish_stream(
            publisher, chunks, stats, rate=rate, strict=strict, on_reject=on_reject, on_sent=on_sent
        )
    finally:
        await transport.close()
