"""Micro benchmark: KafkaTransport against raw aiokafka on the same broker, in one run.

Prints msg/s for raw aiokafka produce (send + gather), our publish_batch, raw
getmany consume (+ commit, as ``sluice bench`` measures it: ``RawKafka``) and
our fetch+commit, plus how long a group subscribe takes.
Each repetition uses a fresh topic prefix; the median and best are printed,
since these machines are noisy.

    python benchmarks/kafka_transport_micro.py --bootstrap 127.0.0.1:19092
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from sluicegate.bench.endpoints import RawKafka
from sluicegate.streams.codec import CONTENT_TYPE
from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.transport import OutMessage
from sluicegate.streams.transports.kafka import KafkaTransport

PARTITIONS = 3
SESSIONS = 100


def make_messages(n: int, size: int) -> list[OutMessage]:
    value = b"x" * size
    return [
        OutMessage(
            "bench",
            value,
            key=f"session-{i % SESSIONS}".encode(),
            headers={"content-type": CONTENT_TYPE, "ce_id": f"{i:026d}"},
        )
        for i in range(n)
    ]


async def raw_produce(
    bootstrap: str, topic: str, messages: Sequence[OutMessage], **options: object
) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [
            await producer.send(
                topic,
                m.value,
                key=m.key,
                partition=partition_for(m.key, PARTITIONS),
                headers=[(k, v.encode()) for k, v in (m.headers or {}).items()],
            )
            for m in messages
        ]
        await asyncio.gather(*futures)
        return len(messages) / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def ours_produce(
    transport: KafkaTransport, messages: Sequence[OutMessage], chunk: int | None
) -> float:
    started = time.perf_counter()
    step = chunk or len(messages)
    for i in range(0, len(messages), step):
        await transport.publish_batch(messages[i : i + step])
    return len(messages) / (time.perf_counter() - started)


async def raw_consume(bootstrap: str, topic: str, n: int, chunk: int) -> float:
    """getmany + a commit per batch: the raw baseline ``sluice bench`` uses too."""
    raw = RawKafka(
        bootstrap, topic=topic, partitions=PARTITIONS, group=f"{topic}.raw", owns_topic=False
    )
    await raw.open()
    try:
        got = 0
        started = time.perf_counter()
        while got < n:
            got += len(await raw.receive(chunk))
        return n / (time.perf_counter() - started)
    finally:
        await raw.close()


async def ours_consume(transport: KafkaTransport, n: int, chunk: int) -> tuple[float, float]:
    """(msg/s of fetch+commit, seconds the group subscribe took)."""
    started = time.perf_counter()
    sub = await transport.subscribe(["bench"], group=f"bench-{uuid.uuid4().hex[:6]}")
    joined = time.perf_counter() - started
    try:
        got = 0
        started = time.perf_counter()
        while got < n:
            batch = await sub.fetch(chunk, timeout=1.0)
            await sub.commit(batch)
            got += len(batch)
        return n / (time.perf_counter() - started), joined
    finally:
        await sub.close()


async def one_round(args: argparse.Namespace, messages: list[OutMessage]) -> dict[str, float]:
    transport = KafkaTransport(
        args.bootstrap, prefix=f"mb{uuid.uuid4().hex[:8]}", partitions=PARTITIONS
    )
    await transport.connect()
    try:
        await transport.ensure_topics(["bench", "raw", "raw_tuned", "chunked"])
        raw_topic = f"{transport.prefix}.raw"
        results: dict[str, float] = {}
        results["raw aiokafka produce (defaults, acks=all)"] = await raw_produce(
            args.bootstrap, raw_topic, messages
        )
        results["raw aiokafka produce (max_batch_size=256KiB)"] = await raw_produce(
            args.bootstrap, f"{transport.prefix}.raw_tuned", messages, max_batch_size=256 * 1024
        )
        results["publish_batch (one call)"] = await ours_produce(transport, messages, None)
        chunked = [OutMessage("chunked", m.value, m.key, m.headers) for m in messages]
        results[f"publish_batch (calls of {args.chunk})"] = await ours_produce(
            transport, chunked, args.chunk
        )
        bench_topic = f"{transport.prefix}.bench"
        results[f"raw getmany (max_records={args.chunk})"] = await raw_consume(
            args.bootstrap, bench_topic, len(messages), args.chunk
        )
        rate, joined = await ours_consume(transport, len(messages), args.chunk)
        results[f"fetch+commit (max_messages={args.chunk})"] = rate
        results["group subscribe latency (s)"] = joined
        return results
    finally:
        await transport.close()


async def main(args: argparse.Namespace) -> None:
    messages = make_messages(args.messages, args.size)
    rounds = [await one_round(args, messages) for _ in range(args.repeat)]
    print(
        f"{args.messages} messages of {args.size} B, {PARTITIONS} partitions, "
        f"{args.repeat} rounds on {args.bootstrap}"
    )
    print(f"{'':48} {'median':>12} {'best':>12}")
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        if name.endswith("(s)"):
            print(f"{name:48} {statistics.median(values):12.3f} {min(values):12.3f}")
        else:
            print(f"{name:48} {statistics.median(values):12,.0f} {max(values):12,.0f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default=os.environ.get("SLUICE_KAFKA_BOOTSTRAP"))
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=1000, help="fetch / publish batch size")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.bootstrap:
        parser.error("--bootstrap (or SLUICE_KAFKA_BOOTSTRAP) is required")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
