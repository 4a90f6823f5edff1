"""Credentials and TLS for real: a nats-server (from the wheel) that requires TLS with client
certificates and authorization, certificates made here by a throwaway CA (trustme).

The server takes a user with a password and a user with an nkey; every
connection must present a certificate the test CA signed. The transport,
built from SLUICE_* settings as every command builds it, connects and
publishes with the right credentials and is refused without them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
import trustme

from sluicegate.localstack.nats_server import nats_server_binary
from sluicegate.runtime import make_transport
from sluicegate.service_security import InvalidSettingError, nats_connect_options
from sluicegate.settings import Settings
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import TransportError
from sluicegate.streams.transports.nats import NatsTransport

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class SecureNats:
    url: str
    ca: Path
    client_cert: Path
    client_key: Path
    nkey_seed: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Until ``proc`` listens on ``port`` (20 s at most); its stderr, if piped, in the error."""
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{what} did not start: {err}".rstrip(": ")) from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNats]:
    home = tmp_path_factory.mktemp("secure-nats")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(home / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(home / "server.pem"))
    server.private_key_pem.write_to_path(str(home / "server.key"))
    client = ca.issue_cert("sluice-client")
    client.cert_chain_pems[0].write_to_path(str(home / "client.pem"))
    client.private_key_pem.write_to_path(str(home / "client.key"))
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (home / "user.nk").write_bytes(seed)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()

    port = _free_port()
    (home / "nats.conf").write_text(
        f"""
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{home / "js"}" }}
tls {{
  cert_file: "{home / "server.pem"}"
  key_file: "{home / "server.key"}"
  ca_file: "{home / "ca.pem"}"
  verify: true
  timeout: 2
}}
authorization {{
  users = [
    {{ user: "alice", password: "s3cret-pw" }}
    {{ nkey: "{public}" }}
  ]
}}
"""
    )
    proc = subprocess.Popen(
        [str(nats_server_binary()), "-c", str(home / "nats.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_port(proc, port, "nats-server with TLS")
        yield SecureNats(
            f"nats://127.0.0.1:{port}",
            home / "ca.pem",
            home / "client.pem",
            home / "client.key",
            home / "user.nk",
        )
    finally:
        proc.terminate()
        proc.wait(10)


def settings(server: SecureNats, **fields: object) -> Settings:
    return Settings(
        nats_url=server.url,
        topic_prefix="secure",
        partitions=1,
        nats_tls_ca=server.ca,
        nats_tls_cert=server.client_cert,
        nats_tls_key=server.client_key,
        **fields,  # type: ignore[arg-type]
    )


async def publish_one(config: Settings) -> int:
    transport = make_transport(config)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        publisher = Publisher(transport)
        event = publisher.prepare({"tenant": "acme", "session": "s", "data": {"prompt": "hi"}})
        return await publisher.publish([event])
    finally:
        await transport.close()


async def test_user_and_password_over_tls_with_a_client_certificate(
    secure_nats: SecureNats,
) -> None:
    config = settings(secure_nats, nats_user="alice", nats_password="s3cret-pw")
    assert await publish_one(config) == 1


async def test_nkey_over_tls(secure_nats: SecureNats) -> None:
    assert await publish_one(settings(secure_nats, nats_nkey_seed=secure_nats.nkey_seed)) == 1


async def refused(config: Settings) -> str:
    transport = NatsTransport(
        config.resolved_nats_url(),
        prefix="secure",
        partitions=1,
        connect_options=nats_connect_options(config),
        connect_timeout=3.0,
        max_reconnect_attempts=0,
    )
    with pytest.raises(TransportError) as caught:
        await transport.connect()
    return str(caught.value)


async def test_refused_without_the_right_credentials(secure_nats: SecureNats) -> None:
    wrong = settings(secure_nats, nats_user="alice", nats_password="wrong")
    # The server closes the connection; nats-py reports an authorization
    # violation or the broken pipe it left, depending on timing.
    assert "cannot connect" in await refused(wrong)
    # No client certificate: the TLS handshake fails (the server verifies clients).
    no_cert = Settings(
        nats_url=secure_nats.url,
        nats_tls_ca=secure_nats.ca,
        nats_user="alice",
        nats_password="s3cret-pw",
    )
    assert "cannot connect" in await refused(no_cert)


def test_unusable_settings_name_the_variable(secure_nats: SecureNats, tmp_path: Path) -> None:
    with pytest.raises(InvalidSettingError, match="SLUICE_NATS_TLS_CA"):
        nats_connect_options(Settings(nats_tls_ca=tmp_path / "missing.pem"))
    with pytest.raises(InvalidSettingError, match="SLUICE_NATS_CREDS"):
        nats_connect_options(Settings(nats_creds=tmp_path / "missing.creds"))
    with pytest.raises(InvalidSettingError, match="without SLUICE_NATS_USER"):
        nats_connect_options(Settings(nats_password="x"))
    with pytest.raises(InvalidSettingError, match="without SLUICE_NATS_TLS_CERT"):
        nats_connect_options(Settings(nats_tls_key=secure_nats.client_key))


@pytest.fixture(scope="module")
def kafka_requiring_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tansu with client authentication required (and no user it would accept)."""
    from sluicegate.localstack.kafka_broker import tansu_binary

    port = _free_port()
    listener = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
            "--authentication",
        ],
        cwd=tmp_path_factory.mktemp("tansu-auth"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(proc, port, "Tansu with --authentication")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_kafka_scram_refused_in_one_line(kafka_requiring_auth: str) -> None:
    """A broker that requires SCRAM and knows no such user: a TransportError saying so.

    (Tansu creates SCRAM users only while authentication is off, on its memory
    storage, so an accepted login cannot be shown here; compose/ has a SASL
    listener for that.)
    """
    config = Settings(
        transport="kafka",
        kafka_bootstrap=kafka_requiring_auth,
        topic_prefix="secure",
        partitions=1,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password="not-known",
    )
    transport = make_transport(config)
    with pytest.raises(TransportError, match="SASL authentication failed") as caught:
        await transport.connect()
    assert "not-known" not in str(caught.value)
