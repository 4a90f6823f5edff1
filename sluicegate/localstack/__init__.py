"""The local stack: NATS with JetStream, a Kafka-protocol broker and PostgreSQL,
started from PyPI wheels on loopback ports, so a fresh machine needs no Docker.

Owns the processes' lifecycle (start, readiness, pid files, stop) and the
settings-driven ``up`` / ``down`` / ``status`` behind ``sluice local``.
Production services are described in ``compose/``.
"""

from sluicegate.localstack._process import (
    InvalidSettingError,
    LocalStackError,
    PortInUseError,
    RunningService,
    free_port,
)
from sluicegate.localstack.kafka_broker import start_kafka
from sluicegate.localstack.nats_server import start_nats
from sluicegate.localstack.postgres_server import start_postgres
from sluicegate.localstack.stack import (
    SERVICE_NAMES,
    ServiceStatus,
    Wiped,
    down,
    env_lines,
    reset,
    status,
    up,
)

__all__ = [
    "SERVICE_NAMES",
    "InvalidSettingError",
    "LocalStackError",
    "PortInUseError",
    "RunningService",
    "ServiceStatus",
    "Wiped",
    "down",
    "env_lines",
    "free_port",
    "reset",
    "start_kafka",
    "start_nats",
    "start_postgres",
    "status",
    "up",
]
