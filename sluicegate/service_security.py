"""Credentials and TLS for the brokers, from settings: what the clients' connect calls take.

The transports stay ignorant of settings: ``runtime.make_transport`` hands
NATS the options of :func:`nats_connect_options` and Kafka those of
:func:`kafka_security_options` (aiokafka's own keyword arguments). Postgres
needs nothing here: its URL carries user, password and ``sslmode`` (and
``sslrootcert``, ``sslcert``, ``sslkey``), which libpq reads as they are.

A file that is named but missing or unreadable, or a combination that cannot
work (SASL without a mechanism, a client key without its certificate), is an
:class:`InvalidSettingError` naming the variable: one line and exit 2 from
every command, before any connection is tried.
"""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path
from typing import Any

from sluicegate.settings import Settings
from sluicegate.streams.errors import SluiceError


class InvalidSettingError(SluiceError, ValueError):
    """A credentials or TLS setting that cannot be used (the message names it)."""


def _readable(path: Path, variable: str) -> str:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise InvalidSettingError(f"{variable}={path}: {exc.strerror or exc}") from None
    return str(path)


def _tls_context(
    ca: Path | None, cert: Path | None, key: Path | None, service: str
) -> ssl.SSLContext:
    """A client TLS context: the CA's (or the system's) roots, and a client certificate if given."""
    prefix = f"SLUICE_{service}_TLS"
    if key is not None and cert is None:
        raise InvalidSettingError(f"{prefix}_KEY is set without {prefix}_CERT")
    cafile = _readable(ca, f"{prefix}_CA") if ca is not None else None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except ssl.SSLError as exc:
        raise InvalidSettingError(f"{prefix}_CA={ca}: not a PEM CA certificate ({exc})") from None
    if cert is not None:
        certfile = _readable(cert, f"{prefix}_CERT")
        keyfile = _readable(key, f"{prefix}_KEY") if key is not None else None
        try:
            context.load_cert_chain(certfile, keyfile)
        except ssl.SSLError as exc:
            raise InvalidSettingError(
                f"{prefix}_CERT={cert}: the certificate and key do not load ({exc})"
            ) from None
    return context


def nats_connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: credentials and TLS."""
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        options["user_credentials"] = _readable(settings.nats_creds, "SLUICE_NATS_CREDS")
    if settings.nats_nkey_seed is not None:
        options["nkeys_seed"] = _readable(settings.nats_nkey_seed, "SLUICE_NATS_NKEY_SEED")
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        if settings.nats_password is not None:
            options["password"] = settings.nats_password.get_secret_value()
    elif settings.nats_password is not None:
        raise InvalidSettingError("SLUICE_NATS_PASSWORD is set without SLUICE_NATS_USER")
    if (options.get("user_credentials") or options.get("nkeys_seed")) and not _has_nkeys():
        raise InvalidSettingError(
            "NATS creds and nkey authentication need the nkeys package: pip install nkeys"
        )
    url = settings.resolved_nats_url()
    if (
        settings.nats_tls_ca is not None
        or settings.nats_tls_cert is not None
        or settings.nats_tls_key is not None
        or url.startswith("tls://")
    ):
        options["tls"] = _tls_context(
            settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key, "NATS"
        )
    return options


def kafka_security_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments (producer, consumer and admin alike): protocol, SASL, TLS."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {}
    if protocol == "PLAINTEXT":
        if settings.kafka_sasl_mechanism or settings.kafka_tls_ca or settings.kafka_tls_cert:
            raise InvalidSettingError(
                "SASL or TLS settings are given but SLUICE_KAFKA_SECURITY_PROTOCOL is PLAINTEXT "
                "(use SSL, SASL_PLAINTEXT or SASL_SSL)"
            )
        return options
    options["security_protocol"] = protocol
    if protocol.startswith("SASL_"):
        if settings.kafka_sasl_mechanism is None:
            raise InvalidSettingError(
                f"SLUICE_KAFKA_SECURITY_PROTOCOL={protocol} needs SLUICE_KAFKA_SASL_MECHANISM "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        if settings.kafka_sasl_username is None or settings.kafka_sasl_password is None:
            raise InvalidSettingError(
                "SASL needs SLUICE_KAFKA_SASL_USERNAME and SLUICE_KAFKA_SASL_PASSWORD"
            )
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    elif settings.kafka_sasl_mechanism is not None:
        raise InvalidSettingError(
            f"SLUICE_KAFKA_SASL_MECHANISM is set but SLUICE_KAFKA_SECURITY_PROTOCOL={protocol} "
            "has no SASL (use SASL_PLAINTEXT or SASL_SSL)"
        )
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _tls_context(
            settings.kafka_tls_ca, settings.kafka_tls_cert, settings.kafka_tls_key, "KAFKA"
        )
    return options


def _has_nkeys() -> bool:
    return importlib.util.find_spec("nkeys") is not None
