"""Micro-benchmark: our NATS transport against raw nats-py, in one process run.

Prints msg/s for
  - raw core publish (no JetStream, the ceiling of the client),
  - raw ``js.publish_async`` with a bounded window,
  - ``NatsTransport.publish_batch``,
  - raw ``psub.fetch(batch)`` + one AckAll per batch,
  - ``NatsSubscription.fetch`` + ``commit``.

Each case gets its own stream (deleted afterwards); the server and this
process share the machine, so compare figures of one run with each other.

    python benchmarks/nats_transport_micro.py --url nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from streams.transport import OutMessage
from streams.transports.nats import NatsTransport


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def _timed(n: int, work: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await work()
    return _rate(n, time.perf_counter() - started)


async def raw_core_publish(nc: Client, n: int, payload: bytes) -> float:
    subject = f"bench.core.{uuid.uuid4().hex}"

    async def work() -> None:
        for _ in range(n):
            await nc.publish(subject, payload)
        await nc.flush()

    return await _timed(n, work)


async def raw_stream(nc: Client, storage: StorageType) -> str:
    name = f"benchraw{uuid.uuid4().hex[:10]}"
    await nc.jetstream().add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], storage=storage, duplicate_window=120)
    )
    return name


async def raw_publish_async(nc: Client, stream: str, n: int, payload: bytes, window: int) -> float:
    js = nc.jetstream(publish_async_max_pending=window)

    async def work() -> None:
        for _ in range(n):
            await js.publish_async(f"{stream}.0", payload)
        await js.publish_async_completed()

    return await _timed(n, work)


async def raw_fetch(nc: Client, stream: str, n: int, batch: int) -> float:
    js = nc.jetstream()
    psub = await js.pull_subscribe(
        f"{stream}.0",
        durable="bench",
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=4 * batch),
    )

    async def work() -> None:
        got = 0
        while got < n:
            msgs = await psub.fetch(min(batch, n - got), timeout=5)
            got += len(msgs)
            await msgs[-1].ack()

    rate = await _timed(n, work)
    await psub.unsubscribe()
    return rate


async def our_publish(t: NatsTransport, n: int, payload: bytes) -> float:
    batch = [OutMessage("bench", payload, key=f"s{i % 64}".encode()) for i in range(n)]
    return await _timed(n, lambda: t.publish_batch(batch))


async def our_fetch(t: NatsTransport, n: int, batch: int) -> float:
    sub = await t.subscribe(["bench"], group="bench")

    async def work() -> None:
        got = 0
        while got < n:
            msgs = await sub.fetch(min(batch, n - got), timeout=5)
            if not msgs:
                raise RuntimeError(f"fetch stalled after {got} of {n} messages")
            got += len(msgs)
            await sub.commit(msgs)

    rate = await _timed(n, work)
    await sub.close()
    return rate


async def main(args: argparse.Namespace) -> None:
    payload = b"x" * args.size
    storage = StorageType.MEMORY if args.storage == "memory" else StorageType.FILE
    nc = await nats.connect(args.url)
    t = NatsTransport(
        args.url,
        prefix=f"bench{uuid.uuid4().hex[:8]}",
        partitions=args.partitions,
        storage=args.storage,
    )
    await t.connect()
    await t.ensure_topics(["bench"])
    raw = await raw_stream(nc, storage)
    n = args.messages
    try:
        results = {
            "raw core publish": await raw_core_publish(nc, n, payload),
            f"raw js.publish_async (window {args.window})": await raw_publish_async(
                nc, raw, n, payload, args.window
            ),
            "our publish_batch": await our_publish(t, n, payload),
            f"raw psub.fetch({args.batch}) + AckAll": await raw_fetch(nc, raw, n, args.batch),
            f"our fetch({args.batch}) + commit": await our_fetch(t, n, args.batch),
        }
    finally:
        js = nc.jetstream()
        await js.delete_stream(raw)
        await js.delete_stream(f"{t.prefix}_bench")
        await t.close()
        await nc.close()
    print(
        f"# {n} messages of {args.size} bytes, {args.storage} storage, "
        f"{args.partitions} partition(s) for ours"
    )
    for name, rate in results.items():
        print(f"{name:<40} {rate:>12,.0f} msg/s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2000, help="fetch batch size")
    parser.add_argument("--window", type=int, default=4096, help="raw publish_async window")
    parser.add_argument("--storage", choices=["file", "memory"], default="file")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
