"""The local stack as a whole, driven by the settings: ``up``, ``down``, ``status``.

A service whose ``SLUICE_*`` URL is set is the user's: it is checked for
reachability and never started or stopped. A URL equal to the local stack's own
address (what ``sluice local up`` prints for ``eval``) still counts as local.
Everything else runs under ``settings.home`` with a pid file, so any process
can find, reuse and stop it.
"""

from __future__ import annotations

import contextlib
import fcntl
import shlex
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sluicegate.localstack._process import (
    KAFKA,
    KINDS,
    LOOPBACK,
    NATS,
    POSTGRES,
    InvalidSettingError,
    LocalStackError,
    RunningService,
    ServiceKind,
    host_port,
    is_our_server,
    log_path,
    pid_path,
    read_pidfile,
    tcp_open,
)
from sluicegate.localstack.kafka_broker import start_kafka
from sluicegate.localstack.nats_server import start_nats
from sluicegate.localstack.postgres_server import start_postgres
from sluicegate.settings import Settings

State = Literal["configured", "running", "stopped"]
Starter = Callable[..., RunningService]

SERVICE_NAMES: tuple[str, ...] = tuple(KINDS)
_STARTERS: dict[str, Starter] = {
    "nats": start_nats,
    "kafka": start_kafka,
    "postgres": start_postgres,
}
ENV_VARS: dict[str, str] = {k.name: k.url_setting for k in KINDS.values()}


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: State
    url: str
    pid: int | None
    detail: str = ""


# --- what the settings say -------------------------------------------------------------


def local_port(kind: ServiceKind, settings: Settings) -> int:
    ports = {
        NATS.name: settings.local_nats_port,
        KAFKA.name: settings.local_kafka_port,
        POSTGRES.name: settings.local_postgres_port,
    }
    return ports[kind.name]


def _set_url(kind: ServiceKind, settings: Settings) -> str | None:
    urls = {
        NATS.name: settings.nats_url,
        KAFKA.name: settings.kafka_bootstrap,
        POSTGRES.name: settings.database_url,
    }
    return urls[kind.name]


def local_url(kind: ServiceKind, settings: Settings) -> str:
    """The address of the local service: what the settings resolve to when its URL is unset."""
    local = settings.model_copy(
        update={"nats_url": None, "kafka_bootstrap": None, "database_url": None}
    )
    resolve = {
        NATS.name: local.resolved_nats_url,
        KAFKA.name: local.resolved_kafka_bootstrap,
        POSTGRES.name: local.resolved_database_url,
    }
    return resolve[kind.name]()


def configured_url(kind: ServiceKind, settings: Settings) -> str | None:
    """The user's URL for this service, or None when the local stack provides it."""
    url = _set_url(kind, settings)
    if url is None or url == local_url(kind, settings):
        return None
    recorded = read_pidfile(pid_path(home_of(settings), kind))
    if recorded is not None and recorded[1] == url:
        return None  # the URL an earlier `up` printed, on a port since changed
    return url


def home_of(settings: Settings) -> Path:
    return settings.home.expanduser().resolve()


def _kinds(services: Iterable[str] | None) -> list[ServiceKind]:
    if services is None:
        return list(KINDS.values())
    unknown = [s for s in services if s not in KINDS]
    if unknown:
        raise ValueError(f"unknown service {unknown[0]!r}: choose from {', '.join(KINDS)}")
    return [KINDS[s] for s in services]


# --- reachability of configured services ------------------------------------------------


def endpoints(kind: ServiceKind, url: str) -> list[tuple[str, int]]:
    """The (host, port) pairs a configured URL names; a server list names several."""
    try:
        if kind is POSTGRES:
            return _postgres_endpoints(url)
        parts = [part.strip() for part in url.split(",") if part.strip()]
        return [host_port(part, kind.standard_port) for part in parts]
    except ValueError as exc:
        raise InvalidSettingError(
            f"{kind.url_setting}={url!r} is not a valid address: {exc}"
        ) from None


def _postgres_endpoints(url: str) -> list[tuple[str, int]]:
    """Hosts and ports of a libpq URL or ``key=value`` string, multi-host ones included."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(str(exc)) from None
    hosts = str(params.get("host") or LOOPBACK).split(",")
    ports = str(params.get("port") or POSTGRES.standard_port).split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    return [(host, int(port)) for host, port in zip(hosts, ports, strict=True)]


def reachable(kind: ServiceKind, url: str) -> bool:
    return any(
        host.startswith("/") or tcp_open(host, port, timeout=2.0)  # a unix socket: not probed
        for host, port in endpoints(kind, url)
    )


def require_reachable(kind: ServiceKind, url: str) -> None:
    if not reachable(kind, url):
        where = ", ".join(f"{h}:{p}" for h, p in endpoints(kind, url))
        raise LocalStackError(
            f"{kind.url_setting} is set, but nothing answers on {where}. Start that service, "
            f"or unset {kind.url_setting} to let `sluice local up` run a local {kind.name}."
        )


# --- running local services -------------------------------------------------------------


def find_running(kind: ServiceKind, home: Path) -> RunningService | None:
    """The local service an earlier ``up`` left running under ``home``, if it still runs."""
    pidfile = pid_path(home, kind)
    recorded = read_pidfile(pidfile)
    if recorded is None:
        return None
    pid, url = recorded
    if not is_our_server(pid, kind, host_port(url, kind.standard_port)[1]):
        pidfile.unlink(missing_ok=True)  # stale: the process is gone
        return None
    return RunningService(kind.name, url, pid, "reused", pidfile, log_path(home, kind))


def up(settings: Settings, services: Sequence[str] | None = None) -> list[RunningService]:
    """Make every service usable: configured ones checked, local ones reused or started.

    All or nothing: when one fails to start, those started by this call are stopped.
    """
    home = home_of(settings)
    result: list[RunningService] = []
    started: list[RunningService] = []
    with exclusive(home):
        try:
            for kind in _kinds(services):
                service = _up_one(kind, settings, home)
                if service.origin == "started":
                    started.append(service)
                result.append(service)
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
    return result


def _up_one(kind: ServiceKind, settings: Settings, home: Path) -> RunningService:
    url = configured_url(kind, settings)
    if url is not None:
        require_reachable(kind, url)
        return RunningService(kind.name, url, None, "configured")
    running = find_running(kind, home)
    if running is not None:
        return running
    return _STARTERS[kind.name](port=local_port(kind, settings), home=home)


def down(settings: Settings, services: Sequence[str] | None = None) -> list[RunningService]:
    """Stop the local services ``up`` started under the home; return those it stopped."""
    home = home_of(settings)
    stopped: list[RunningService] = []
    with exclusive(home):
        for kind in _kinds(services):
            running = find_running(kind, home)
            if running is not None:
                running.stop()
                stopped.append(running)
    return stopped


# Where each service keeps its data under the home (logs and pid files stay).
DATA_DIRS: dict[str, str] = {"nats": "nats", "kafka": "kafka", "postgres": "postgres"}


@dataclass(frozen=True)
class Wiped:
    name: str
    freed_bytes: int
    was_running: bool


def reset(settings: Settings, services: Sequence[str] | None = None) -> list[Wiped]:
    """Stop the local services and delete their data under the home.

    Configured services (their URL set) are the user's: never touched. What
    was running is reported so the caller can start it again, afresh.
    """
    home = home_of(settings)
    wiped: list[Wiped] = []
    with exclusive(home):
        for kind in _kinds(services):
            if configured_url(kind, settings) is not None:
                continue
            running = find_running(kind, home)
            if running is not None:
                running.stop()
            data = home / DATA_DIRS[kind.name]
            freed = _size(data)
            if data.exists():
                shutil.rmtree(data)
            wiped.append(Wiped(kind.name, freed, running is not None))
    return wiped


def _size(path: Path) -> int:
    total = 0
    for item in path.rglob("*") if path.exists() else ():
        with contextlib.suppress(OSError):  # a file removed meanwhile
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
    return total


@contextlib.contextmanager
def exclusive(home: Path) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per home: two racing ``up``s would both start servers."""
    lock = home / "run" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def status(settings: Settings) -> list[ServiceStatus]:
    home = home_of(settings)
    return [_status_one(kind, settings, home) for kind in KINDS.values()]


def _status_one(kind: ServiceKind, settings: Settings, home: Path) -> ServiceStatus:
    url = configured_url(kind, settings)
    if url is not None:
        detail = "reachable" if reachable(kind, url) else "NOT reachable"
        return ServiceStatus(kind.name, "configured", url, None, detail)
    running = find_running(kind, home)
    if running is not None:
        return ServiceStatus(kind.name, "running", running.url, running.pid, str(running.log))
    return ServiceStatus(kind.name, "stopped", local_url(kind, settings), None)


def env_lines(services: Iterable[RunningService]) -> list[str]:
    """``export SLUICE_...=...`` for each local service (configured ones are already set)."""
    return [
        f"export {ENV_VARS[s.name]}={shlex.quote(s.url)}"
        for s in services
        if s.origin != "configured"
    ]
