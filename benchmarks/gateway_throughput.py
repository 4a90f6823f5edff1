"""Gateway benchmark: tasks/s submitted through ``sluice serve`` against ``Publisher``, one run.

Figures (tasks acknowledged by the broker per second), in one run since these
machines are noisy:

- ``publisher_bulk``: ``Publisher.prepare`` + ``publish`` of plain task objects
  in batches of 500, in this process: what one process can put on the topic
  with the library, validation included (the gateway validates the same way);
- ``publisher_calls``: the same, one task per ``publish`` call from 64
  concurrent callers: the library at the granularity of one HTTP request;
- ``gateway_single`` / ``gateway_batch``: ``sluice serve`` as one process,
  driven by Locust (FastHttpUser, one process) as fast as it answers, one
  task per ``POST /v1/tasks`` or ``--batch`` tasks per ``POST /v1/tasks:batch``;
- ``gateway_fixed_rate``: single-task requests at ``--rate`` requests/s:
  p50 and p99 latency (Locust's, in ms, rounded as Locust rounds them).

Budget (DESIGN.md, issue 19): the gateway on one process >= 0.5 x Publisher.
The load generator shares the machine's cores with the gateway, NATS and
Postgres, so the gateway's figures are lower bounds. The Publisher rounds run
before and after the HTTP rounds; their mean is the baseline.

Needs NATS and Postgres (SLUICE_NATS_URL, SLUICE_DATABASE_URL); everything
lives under a throwaway topic prefix and schema, removed at the end.

    .venv/bin/python benchmarks/gateway_throughput.py [--seconds 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.sinks import api_keys
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.streams.publisher import Publisher

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def task(n: int) -> dict[str, Any]:
    return {"tenant": "bench", "session": f"bench-{n % 64}", "data": {"prompt": f"what is {n} * 3"}}


async def publisher_bulk(settings: Settings, n: int) -> float:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        publisher = Publisher(transport, batch_size=500)
        started = time.perf_counter()
        await publisher.publish(publisher.prepare(task(i)) for i in range(n))
        return n / (time.perf_counter() - started)
    finally:
        await transport.close()


async def publisher_calls(settings: Settings, n: int, callers: int = 64) -> float:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        publisher = Publisher(transport, batch_size=500)
        counter = iter(range(n))

        async def caller() -> None:
            for i in counter:
                await publisher.publish([publisher.prepare(task(i))])

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return n / (time.perf_counter() - started)
    finally:
        await transport.close()


async def prepare(settings: Settings) -> str:
    await migrate(settings.resolved_database_url(), schema=settings.db_schema)
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        return (await api_keys.create_key(conn, "bench", label="benchmark")).key
    finally:
        await conn.close()


async def cleanup(settings: Settings) -> None:
    import nats

    conn = await connect(settings.resolved_database_url(), schema="public")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()
    nc = await nats.connect(settings.resolved_nats_url())
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(f"{settings.topic_prefix}_"):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(BIN / "sluice"), "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    err = proc.stderr.read().decode() if proc.stderr else ""
    raise RuntimeError(f"sluice serve did not start: {err.strip()}")


def locust(
    url: str, key: str, *, batch: int, users: int, seconds: int, user_rate: float | None = None
) -> dict[str, float]:
    """One headless Locust run; the aggregated row of its CSV stats."""
    env = {**os.environ, "SLUICE_BENCH_KEY": key, "SLUICE_BENCH_BATCH": str(batch)}
    if user_rate is not None:
        env["SLUICE_BENCH_USER_RATE"] = str(user_rate)
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "run"
        subprocess.run(
            [
                str(BIN / "locust"),
                "-f",
                str(HERE / "gateway_locustfile.py"),
                "--headless",
                "--only-summary",
                "--host",
                url,
                "-u",
                str(users),
                "-r",
                str(users),  # all users within the first second
                "-t",
                f"{seconds}s",
                "--csv",
                str(stats),
                "--loglevel",
                "WARNING",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(f"{stats}_stats.csv") as f:
            row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    requests = float(row["Request Count"])
    return {
        "requests": requests,
        "failures": float(row["Failure Count"]),
        "requests_per_s": float(row["Requests/s"]),
        "tasks_per_s": float(row["Requests/s"]) * batch,
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"gwb{uuid.uuid4().hex[:8]}"
    settings = Settings(topic_prefix=prefix, db_schema=f"s_{prefix}", partitions=4)
    key = asyncio.run(prepare(settings))
    port = free_port()
    env = {
        **os.environ,
        "SLUICE_TOPIC_PREFIX": prefix,
        "SLUICE_DB_SCHEMA": settings.db_schema,
        "SLUICE_PARTITIONS": "4",
    }
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "transport": settings.transport,
    }
    try:
        bulk = [asyncio.run(publisher_bulk(settings, args.messages))]
        calls = [asyncio.run(publisher_calls(settings, args.messages))]
        gateway = start_gateway(env, port)
        url = f"http://127.0.0.1:{port}"
        try:
            single = locust(url, key, batch=1, users=args.users, seconds=args.seconds)
            batched = locust(url, key, batch=args.batch, users=args.users, seconds=args.seconds)
            # The fixed rate: users x per-user rate = --rate requests/s.
            fixed = locust(
                url,
                key,
                batch=1,
                users=args.users,
                seconds=args.seconds,
                user_rate=args.rate / args.users,
            )
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(30)
        bulk.append(asyncio.run(publisher_bulk(settings, args.messages)))
        calls.append(asyncio.run(publisher_calls(settings, args.messages)))
    finally:
        asyncio.run(cleanup(settings))
    baseline = sum(bulk) / len(bulk)
    per_call = sum(calls) / len(calls)
    report.update(
        {
            "publisher_bulk_tasks_per_s": [round(x) for x in bulk],
            "publisher_calls_tasks_per_s": [round(x) for x in calls],
            "gateway_single": single,
            "gateway_batch": {**batched, "batch": args.batch},
            "gateway_fixed_rate": {**fixed, "rate": args.rate},
            "ratios": {
                "single_vs_publisher_bulk": round(single["tasks_per_s"] / baseline, 3),
                "batch_vs_publisher_bulk": round(batched["tasks_per_s"] / baseline, 3),
                "single_vs_publisher_calls": round(single["tasks_per_s"] / per_call, 3),
            },
        }
    )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000, help="Tasks per Publisher round.")
    parser.add_argument("--seconds", type=int, default=15, help="Length of each HTTP round.")
    parser.add_argument("--users", type=int, default=32, help="Concurrent Locust users.")
    parser.add_argument("--batch", type=int, default=100, help="Tasks per batch request.")
    parser.add_argument("--rate", type=float, default=500.0, help="Fixed-rate round, requests/s.")
    parser.add_argument("--json", default=None, help="Also write the figures to this file.")
    cli = parser.parse_args()
    result = main(cli)
    print(json.dumps(result, indent=2))
    if cli.json:
        with open(cli.json, "w") as out:
            json.dump(result, out, indent=2)
