"""Settings from ``SLUICE_*`` environment variables.

An unset service URL means "use the local stack": ``sluice local up`` starts
that service on its own loopback port and the URL below points at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluicegate.streams.runner import DEFAULT_MAX_IN_FLIGHT, RunnerConfig

TransportName = Literal["nats", "kafka"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore")

    transport: TransportName = "nats"
    nats_url: str | None = None
    kafka_bootstrap: str | None = None
    database_url: str | None = None
    db_schema: str = Field(default="sluice", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    topic_prefix: str = Field(default="sluice", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    partitions: int = Field(default=4, ge=1, le=256)
    otlp_endpoint: str | None = None
    # Share of new traces kept (parent-based: a trace is kept or dropped whole).
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # `sluice run` serves Prometheus metrics on this port (and metrics_host) when set.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    # The runner: inputs fetched and not yet checkpointed, per step; how long a
    # checkpoint waits for more completions to join it; how long in-flight
    # events may take to finish on shutdown or when partitions are revoked.
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1, le=1_000_000)
    commit_interval_ms: float = Field(default=2.0, ge=0, le=60_000)
    drain_timeout: float = Field(default=10.0, ge=0, le=3600)
    # Seconds between a worker's progress lines (0: none).
    progress_interval: float = Field(default=30.0, ge=0, le=86_400)
    # Faults (seconds): how long a worker rides out a broker or Postgres outage
    # before it gives up (exit 1, one line); how long a partition may have lag
    # and no progress before it is reported stalled and its reader repaired
    # (0: never); how long after SIGTERM a worker exits whatever it is doing
    # (a second SIGTERM: at once); Postgres connect and per-operation limits.
    outage_patience: float = Field(default=300.0, gt=0, le=86_400)
    stall_timeout: float = Field(default=30.0, ge=0, le=86_400)
    shutdown_grace: float = Field(default=30.0, gt=0, le=3600)
    db_connect_timeout: float = Field(default=10.0, gt=0, le=600)
    db_statement_timeout: float = Field(default=30.0, gt=0, le=3600)

    # The local stack: where it keeps its files and which loopback ports it uses.
    home: Path = Path(".sluice")
    local_nats_port: int = Field(default=14222, ge=1, le=65535)
    local_kafka_port: int = Field(default=19092, ge=1, le=65535)
    local_postgres_port: int = Field(default=15432, ge=1, le=65535)
    # Streams the local stack's NATS gets keep messages this long (a laptop's
    # .sluice must not grow without bound). By age, not size: JetStream
    # reserves a stream's byte limit up front, and a few prefixes' worth of
    # reservations would exhaust the store (insufficient storage resources).
    local_retention_hours: float = Field(default=24.0, gt=0, le=24 * 365)

    # Credentials and TLS of the services (sluicegate/service_security.py).
    # NATS: a .creds file (JWT and nkey seed), or an nkey seed file, or user
    # and password (the URL's user:password@ works too); TLS when a CA or a
    # client certificate is given or the URL is tls://.
    nats_creds: Path | None = None
    nats_nkey_seed: Path | None = None
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    # Kafka: the security protocol, the SASL mechanism and its credentials,
    # and TLS (a CA for the brokers' certificates, a client certificate).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_tls_ca: Path | None = None
    kafka_tls_cert: Path | None = None
    kafka_tls_key: Path | None = None

    # `sluice serve`, the HTTP gateway: where it listens; events accepted and
    # not yet acknowledged by the broker beyond which it answers 429; the most
    # events one batch request may carry and the largest body it may send
    # (one event is at most the envelope's 1 MiB); the longest ?wait= a task
    # read may ask for; how long a checked API key is trusted before it is
    # looked up again (so a revoked key stops working within this time).
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_max_pending: int = Field(default=20_000, ge=1, le=10_000_000)
    gateway_max_batch: int = Field(default=1000, ge=1, le=100_000)
    gateway_max_body_mb: float = Field(default=8.0, gt=0, le=1024)
    gateway_max_wait: float = Field(default=60.0, ge=0, le=3600)
    gateway_key_cache: float = Field(default=5.0, ge=0, le=3600)

    @field_validator("nats_url", "kafka_bootstrap", "database_url", "otlp_endpoint")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator(
        "nats_creds",
        "nats_nkey_seed",
        "nats_user",
        "nats_password",
        "nats_tls_ca",
        "nats_tls_cert",
        "nats_tls_key",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_tls_ca",
        "kafka_tls_cert",
        "kafka_tls_key",
        mode="before",
    )
    @classmethod
    def _blank_credential_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _blank_port_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def runner_config(self) -> RunnerConfig:
        """The step runners' configuration these settings give."""
        return RunnerConfig(
            max_in_flight=self.max_in_flight,
            commit_interval_s=self.commit_interval_ms / 1000,
            drain_timeout_s=self.drain_timeout,
            outage_patience_s=self.outage_patience,
            stall_timeout_s=self.stall_timeout,
        )

    def resolved_nats_url(self) -> str:
        return self.nats_url or f"nats://127.0.0.1:{self.local_nats_port}"

    def resolved_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.local_kafka_port}"

    def resolved_database_url(self) -> str:
        return self.database_url or (
            f"postgresql://postgres@127.0.0.1:{self.local_postgres_port}/postgres"
        )
