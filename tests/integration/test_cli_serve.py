"""``sluice serve`` as a command: it starts, answers, stops on SIGTERM, and fails in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

from sluicegate.settings import Settings
from tests.integration.gateway_support import in_thread, new_key
from tests.integration.pipeline_support import env_for, prepare_database, settings_for

pytestmark = pytest.mark.integration

SLUICE = str(Path(sys.executable).parent / "sluice")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(nats_url: str, database_url: str, prefix: str) -> Settings:
    return settings_for(
        "nats", nats_url=nats_url, kafka_bootstrap="x:1", database_url=database_url, prefix=prefix
    )


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {**base, **env_for(settings), **extra}


def test_serve_starts_answers_and_stops(nats_url: str, database_url: str, prefix: str) -> None:
    settings = config(nats_url, database_url, prefix)
    in_thread(lambda: prepare_database(settings))
    key = new_key(settings, "acme")
    port = free_port()
    proc = subprocess.Popen(
        [SLUICE, "serve", "--port", str(port)],
        env=environment(settings),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()  # printed once it listens
        assert f"listening on http://127.0.0.1:{port}" in banner, banner
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/tasks",
            data=orjson.dumps({"session": "a-cli", "data": {"prompt": "what is 1 + 1"}}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 202
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert "stopped" in (proc.stderr.read() if proc.stderr else "")


def test_serve_failures_are_one_line(nats_url: str, database_url: str, prefix: str) -> None:
    settings = config(nats_url, database_url, prefix)  # its schema is not migrated
    cases = [
        ({}, 1, "run `sluice db migrate` first"),
        ({"SLUICE_GATEWAY_PORT": "http"}, 2, "SLUICE_GATEWAY_PORT"),
        ({"SLUICE_NATS_TLS_CA": "/nonexistent/ca.pem"}, 2, "SLUICE_NATS_TLS_CA"),
    ]
    for extra, want, says in cases:
        done = subprocess.run(
            [SLUICE, "serve"],
            env=environment(settings, **{"SLUICE_GATEWAY_PORT": str(free_port()), **extra}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = done.stderr.strip().splitlines()
        assert (done.returncode, len(lines)) == (want, 1), (extra, done.stderr)
        assert says in lines[0] and "Traceback" not in done.stderr
