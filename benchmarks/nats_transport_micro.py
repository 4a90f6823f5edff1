"""Micro-benchmark: our NATS transport against raw nats-py, in one process run.

Prints msg/s for
  - raw core publish (no JetStream, the ceiling of the client),
  - raw ``js.publish_async`` with a bounded window,
  - ``NatsTransport.publish_batch``,
  - raw ``psub.fetch(batch)`` + one AckAll per batch,
  - ``NatsSubscription.fetch`` + ``commit``.

Each case gets its own stream (deleted afterwards); ``sluice bench --mode
transport`` measures the same raw clients end to end (publish and consume
together, with latency), from ``sluicegate.bench.endpoints``. The server and this
process share the machine, so compare figures of one run with each other.
The second column is this process's CPU time per message: on a busy machine
it is steadier than the rate.

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
from nats.js.api import AckPolicy, ConsumerConfig, StorageType

from sluicegate.bench.endpoints import create_raw_stream
from sluicegate.streams.transport import OutMessage
from sluicegate.streams.transports.nats import NatsTransport

Result = tuple[float, float]  # msg/s, client CPU microseconds per message


async def _timed(n: int, work: Callable[[], Awaitable[None]]) -> Result:
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (n / wall if wall > 0 else float("inf")), cpu / n * 1e6


async def raw_core_publish(nc: Client, n: int, payload: bytes) -> Result:
    subject = f"bench.core.{uuid.uuid4().hex}"

    async def work() -> None:
        for _ in range(n):
            await nc.publish(subject, payload)
        await nc.flush()

    return await _timed(n, work)


async def raw_stream(nc: Client, storage: StorageType) -> str:
    # The same raw stream `sluice bench` measures its JetStream baseline on.
    return await create_raw_stream(nc, f"benchraw{uuid.uuid4().hex[:10]}", storage)


def event_headers(ce_headers: bool) -> dict[str, str] | None:
    """CloudEvents headers as the pipeline sends them, with a fresh event id."""
    if not ce_headers:
        return None
    return {
        "content-type": "application/cloudevents+json",
        "ce_id": uuid.uuid4().hex,
        "ce_type": "task.submitted",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


async def raw_publish_async(
    nc: Client, stream: str, n: int, payload: bytes, window: int, ce_headers: bool
) -> Result:
    js = nc.jetstream(publish_async_max_pending=window)
    headers = [event_headers(ce_headers) for _ in range(n)]
    for h in headers:
        if h is not None:
            h["Nats-Msg-Id"] = h["ce_id"]  # what our transport adds

    async def work() -> None:
        for h in headers:
            await js.publish_async(f"{stream}.0", payload, headers=h)
        await js.publish_async_completed()

    return await _timed(n, work)


async def raw_fetch(nc: Client, stream: str, n: int, batch: int) -> Result:
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

    result = await _timed(n, work)
    await psub.unsubscribe()
    return result


async def our_publish(t: NatsTransport, n: int, payload: bytes, ce_headers: bool) -> Result:
    batch = [
        OutMessage("bench", payload, key=f"s{i % 64}".encode(), headers=event_headers(ce_headers))
        for i in range(n)
    ]
    return await _timed(n, lambda: t.publish_batch(batch))


async def our_fetch(t: NatsTransport, n: int, batch: int) -> Result:
    sub = await t.subscribe(["bench"], group="bench")

    async def work() -> None:
        got = 0
        while got < n:
            msgs = await sub.fetch(min(batch, n - got), timeout=5)
            if not msgs:
                raise RuntimeError(f"fetch stalled after {got} of {n} messages")
            got += len(msgs)
            await sub.commit(msgs)

    result = await _timed(n, work)
    await sub.close()
    return result


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
                nc, raw, n, payload, args.window, args.ce_headers
            ),
            "our publish_batch": await our_publish(t, n, payload, args.ce_headers),
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
        f"{args.partitions} partition(s) for ours, "
        + ("CloudEvents headers" if args.ce_headers else "no headers (ours: the key header)")
    )
    for name, (rate, cpu_us) in results.items():
        print(f"{name:<40} {rate:>10,.0f} msg/s {cpu_us:>7.1f} us CPU/msg")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2000, help="fetch batch size")
    parser.add_argument("--window", type=int, default=4096, help="raw publish_async window")
    parser.add_argument("--storage", choices=["file", "memory"], default="file")
    parser.add_argument(
        "--ce-headers",
        action="store_true",
        help="publish with the pipeline's CloudEvents headers and a unique Nats-Msg-Id",
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
