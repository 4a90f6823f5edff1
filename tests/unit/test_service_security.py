"""Kafka's security settings to aiokafka options (no Kafka here speaks SASL or TLS: see README)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from sluicegate.runtime import make_transport
from sluicegate.service_security import InvalidSettingError, kafka_security_options
from sluicegate.settings import Settings


def test_plaintext_is_no_options() -> None:
    assert kafka_security_options(Settings()) == {}


def test_sasl_scram_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    options = kafka_security_options(
        Settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="svc",
            kafka_sasl_password="pw",
            kafka_tls_ca=tmp_path / "ca.pem",
        )
    )
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    # The transport takes them (each aiokafka client picks what it accepts).
    transport = make_transport(
        Settings(
            transport="kafka",
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="svc",
            kafka_sasl_password="pw",
        )
    )
    assert transport.name == "kafka"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "SLUICE_KAFKA_SASL_MECHANISM"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"},
            "SLUICE_KAFKA_SASL_USERNAME",
        ),
        ({"kafka_sasl_mechanism": "PLAIN"}, "PLAINTEXT"),
        ({"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": "PLAIN"}, "has no SASL"),
        ({"kafka_security_protocol": "SSL", "kafka_tls_ca": "/nonexistent/ca.pem"}, "KAFKA_TLS_CA"),
    ],
)
def test_unusable_combinations_name_the_variable(fields: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidSettingError, match=named):
        kafka_security_options(Settings(**fields))  # type: ignore[arg-type]


def test_passwords_do_not_show() -> None:
    settings = Settings(nats_user="u", nats_password="hunter2", kafka_sasl_password="hunter3")
    assert "hunter" not in repr(settings)


def test_faust_broker_credentials(tmp_path: Path) -> None:
    import faust

    from sluicegate.faust_engine.app import broker_credentials, build_app

    assert broker_credentials({}) is None
    sasl = broker_credentials(
        kafka_security_options(
            Settings(
                kafka_security_protocol="SASL_PLAINTEXT",
                kafka_sasl_mechanism="SCRAM-SHA-256",
                kafka_sasl_username="svc",
                kafka_sasl_password="pw",
            )
        )
    )
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.username, sasl.password, sasl.protocol.value) == ("svc", "pw", "SASL_PLAINTEXT")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = kafka_security_options(
        Settings(kafka_security_protocol="SSL", kafka_tls_ca=tmp_path / "ca.pem")
    )
    assert isinstance(broker_credentials(tls), faust.SSLCredentials)
    app = build_app(
        app_id="t", bootstrap="127.0.0.1:1", partitions=1, datadir=tmp_path, security=tls
    )
    assert isinstance(app.conf.broker_credentials, faust.SSLCredentials)
