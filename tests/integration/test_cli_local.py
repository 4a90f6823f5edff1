"""``sluice local up|status|down`` as users run them: separate processes sharing pid files.

Each call is its own Python process, so ``down`` and ``status`` find the servers
``up`` started only through the pid files under SLUICE_HOME.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluicegate.localstack import free_port
from tests.integration.test_localstack import processes_mentioning

pytestmark = pytest.mark.integration

RUN_SLUICE = "import sys; from sluicegate.cli import main; sys.exit(main())"


class Sluice:
    """Runs ``sluice`` in a subprocess with a given environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", RUN_SLUICE, *args],
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def status(self, **extra_env: str) -> dict[str, dict[str, Any]]:
        result = self("local", "status", "--json", **extra_env)
        assert result.returncode == 0, result.stderr
        return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "sluice-home"


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("nats", "kafka", "postgres")}


@pytest.fixture
def sluice(home: Path, ports: dict[str, int]) -> Iterator[Sluice]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_HOME"] = str(home)
    for name, port in ports.items():
        env[f"SLUICE_LOCAL_{name.upper()}_PORT"] = str(port)
    runner = Sluice(env)
    yield runner
    runner("local", "down")  # whatever a failed test left running


def exports(stdout: str) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in stdout.splitlines())
    return dict(pairs)


def test_up_status_down(sluice: Sluice, home: Path, ports: dict[str, int]) -> None:
    expected = {
        "SLUICE_NATS_URL": f"nats://127.0.0.1:{ports['nats']}",
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "SLUICE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{ports['postgres']}/postgres",
    }
    assert {row["state"] for row in sluice.status().values()} == {"stopped"}

    first = sluice("local", "up")
    assert first.returncode == 0, first.stderr
    # stdout is only the export lines, ready for eval "$(sluice local up)".
    assert exports(first.stdout) == expected
    assert first.stderr.count("started") == 3, first.stderr
    running = sluice.status()
    pids = {name: row["pid"] for name, row in running.items()}
    assert {row["state"] for row in running.values()} == {"running"}
    assert all(isinstance(pid, int) for pid in pids.values())

    again = sluice("local", "up")
    assert again.returncode == 0, again.stderr
    assert exports(again.stdout) == expected
    assert again.stderr.count("reused") == 3, again.stderr
    assert {name: row["pid"] for name, row in sluice.status().items()} == pids

    # After eval, the URLs are set; they name the local stack, so it stays "running".
    evaluated = sluice.status(**expected)
    assert {row["state"] for row in evaluated.values()} == {"running"}

    down = sluice("local", "down")
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped") == 3, down.stdout
    assert not processes_mentioning(home)
    assert {row["state"] for row in sluice.status().values()} == {"stopped"}
    assert "nothing to stop" in sluice("local", "down").stdout


def test_configured_service_is_checked_not_started(sluice: Sluice, home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as external:
        external.bind(("127.0.0.1", 0))
        external.listen()
        url = f"nats://127.0.0.1:{external.getsockname()[1]}"

        result = sluice("local", "up", "nats", SLUICE_NATS_URL=url)
        assert result.returncode == 0, result.stderr
        assert "configured" in result.stderr
        assert result.stdout == ""  # nothing local to export
        assert not processes_mentioning(home)
        row = sluice.status(SLUICE_NATS_URL=url)["nats"]
        assert (row["state"], row["url"], row["detail"]) == ("configured", url, "reachable")

    unreachable = sluice("local", "up", "nats", SLUICE_NATS_URL=url)
    assert unreachable.returncode == 1
    assert "SLUICE_NATS_URL" in unreachable.stderr
    assert sluice.status(SLUICE_NATS_URL=url)["nats"]["detail"] == "NOT reachable"


def test_taken_port_fails_up_and_stops_what_it_started(
    sluice: Sluice, home: Path, ports: dict[str, int]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # nats starts first, then kafka cannot: up is all or nothing.
        result = sluice("local", "up", "nats", "kafka", SLUICE_LOCAL_KAFKA_PORT=str(taken))
    assert result.returncode == 1
    assert str(taken) in result.stderr
    assert "SLUICE_LOCAL_KAFKA_PORT" in result.stderr
    assert not processes_mentioning(home)
    assert sluice.status()["nats"]["state"] == "stopped"


def test_reset_wipes_the_data_and_starts_afresh(
    sluice: Sluice, home: Path, ports: dict[str, int]
) -> None:
    up = sluice("local", "up", "nats")
    assert up.returncode == 0, up.stderr
    url = exports(up.stdout)["SLUICE_NATS_URL"]
    # A stream made for the local stack: bounded by age.
    made = subprocess.run(
        [sys.executable, "-c", MAKE_STREAM, url],
        env={**sluice.env, "SLUICE_NATS_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.split() == ["-1", "86400.0"]  # by age; no byte reservation
    assert "max_file_store" in (home / "nats.conf").read_text()

    refused = sluice("local", "reset", "nats")  # no terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    reset = sluice("local", "reset", "nats", "--yes")
    assert reset.returncode == 0, reset.stderr
    assert reset.stderr.startswith("reset nats: freed ")
    assert exports(reset.stdout) == {"SLUICE_NATS_URL": url}  # running again
    streams = subprocess.run(
        [sys.executable, "-c", COUNT_STREAMS, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert streams.stdout.strip() == "0", streams.stderr


MAKE_STREAM = """
import asyncio, sys
import nats
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings

async def main():
    settings = Settings(local_nats_port=int(sys.argv[1].rsplit(":", 1)[1]))
    transport = make_transport(settings, "nats")
    await transport.connect()
    await transport.ensure_topics(["tasks"])
    await transport.close()
    nc = await nats.connect(sys.argv[1])
    info = await nc.jetstream().stream_info("sluice_tasks")
    print(info.config.max_bytes, info.config.max_age)
    await nc.close()

asyncio.run(main())
"""

COUNT_STREAMS = """
import asyncio, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    print(len(await nc.jetstream().streams_info()))
    await nc.close()

asyncio.run(main())
"""
