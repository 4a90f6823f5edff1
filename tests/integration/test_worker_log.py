"""A ``sluice run`` worker as an operator sees it: its log lines and its health endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sluicegate.localstack import free_port
from tests.integration.pipeline_support import (
    calculator_task,
    env_for,
    prepare_database,
    publish_events,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0  # not serving yet


async def until(what: str, check: object, timeout_s: float = 60.0) -> None:
    """Poll ``check()`` until true; bounded, so a bug fails instead of hanging."""
    assert callable(check)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if await asyncio.to_thread(check):
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"never: {what}")


async def test_a_worker_says_what_it_is_what_it_does_and_what_it_did(
    nats_url: str, database_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(
        "nats", nats_url=nats_url, kafka_bootstrap="x:1", database_url=database_url, prefix=prefix
    )
    await prepare_database(settings)
    port, log = free_port(), tmp_path / "worker.log"
    env = {**os.environ, **env_for(settings), "SLUICE_PROGRESS_INTERVAL": "1"}
    argv = [sys.executable, "-m", "sluicegate", "run", "--metrics-port", str(port)]
    with log.open("wb") as sink:
        worker = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink)
    try:
        ready = f"http://127.0.0.1:{port}/readyz"
        await until("/readyz answers 200", lambda: status_of(ready) == 200)
        assert status_of(f"http://127.0.0.1:{port}/healthz") == 200
        await publish_events(settings, [calculator_task(i, 3).event for i in range(3)])
        assert await wait_for_results(settings, 3, timeout_s=60) == 3
        await until("a progress line", lambda: "progress intake: in 3," in log.read_text())
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    lines = log.read_text().splitlines()
    starting = [line for line in lines if "worker starting:" in line]
    assert len(starting) == 1, lines
    assert (
        f"pipeline reference, transport nats (native), "
        f"steps intake,context,planner,gate,tools,responder, partitions 4 "
        f"(this worker: shared with the group), prefix {prefix}, schema s_{prefix}, "
        "policy bundle sha256:"
    ) in starting[0]
    stopped = [line for line in lines if "worker stopped after" in line]
    assert len(stopped) == 1 and "intake in 3 out 3 dead letters 0 skipped 0" in stopped[0]
    progress = [line for line in lines if " progress intake: " in line]
    assert progress and all("lag " in line for line in progress)
