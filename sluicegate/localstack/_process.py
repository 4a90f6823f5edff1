"""Process plumbing shared by the local services.

Owns: loopback ports, spawning a server detached from the caller's session,
pid files under the stack's home, liveness checks that survive pid reuse,
readiness polling with the service's log in the error, and stopping by pid from
any process. Nothing here knows about a particular server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from sluicegate.streams.errors import SluiceError

LOOPBACK = "127.0.0.1"

Origin = Literal["started", "reused", "configured"]
T = TypeVar("T")


class LocalStackError(SluiceError, RuntimeError):
    """A local service could not be started, reached or stopped."""


class InvalidSettingError(LocalStackError):
    """A SLUICE_* value the stack cannot use as it is (e.g. a URL with no valid port)."""


class PortInUseError(LocalStackError):
    """The loopback port a local service should listen on is taken by something else."""


@dataclass(frozen=True)
class ServiceKind:
    """What the stack needs to know about one kind of service."""

    name: str
    program: str  # basename of the server binary, checked in /proc/<pid>/cmdline
    stop_signal: signal.Signals
    url_setting: str  # the SLUICE_* variable that points at an external service
    port_setting: str  # the SLUICE_LOCAL_* variable that moves the local one
    standard_port: int  # default port of a configured URL that names none


NATS = ServiceKind(
    "nats", "nats-server", signal.SIGTERM, "SLUICE_NATS_URL", "SLUICE_LOCAL_NATS_PORT", 4222
)
KAFKA = ServiceKind(
    "kafka", "tansu", signal.SIGTERM, "SLUICE_KAFKA_BOOTSTRAP", "SLUICE_LOCAL_KAFKA_PORT", 9092
)
# SIGINT is Postgres' "fast" shutdown: SIGTERM ("smart") would wait for every
# client to disconnect, which a forgotten pool can make last forever.
POSTGRES = ServiceKind(
    "postgres", "postgres", signal.SIGINT, "SLUICE_DATABASE_URL", "SLUICE_LOCAL_POSTGRES_PORT", 5432
)
KINDS: dict[str, ServiceKind] = {k.name: k for k in (NATS, KAFKA, POSTGRES)}

# Popen objects of servers this process started, by pid, so that stopping one
# reaps it (no zombie) and Python never warns that it is "still running".
_children: dict[int, subprocess.Popen[bytes]] = {}


# --- ports -------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the servers set it: a port in TIME_WAIT is usable,
        # a port with a listener (on loopback or the wildcard) is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def ensure_port_free(kind: ServiceKind, port: int) -> None:
    if not port_is_free(port):
        raise PortInUseError(
            f"cannot start the local {kind.name}: port {port} on {LOOPBACK} is already in use "
            f"by another process. Set {kind.port_setting} to a free port, or stop what "
            f"listens on {port}."
        )


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def host_port(url: str, default_port: int) -> tuple[str, int]:
    """Host and port of ``scheme://host:port/...`` or of a bare ``host:port``."""
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or LOOPBACK, parts.port or default_port


# --- files under home ----------------------------------------------------------


def log_path(home: Path, kind: ServiceKind) -> Path:
    return home / "logs" / f"{kind.name}.log"


def pid_path(home: Path, kind: ServiceKind) -> Path:
    return home / "run" / f"{kind.name}.pid"


def write_pidfile(path: Path, pid: int, url: str) -> None:
    """Line 1 the pid (so ``kill $(head -1 FILE)`` works), line 2 the service's URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n{url}\n")
    tmp.replace(path)  # atomic: another process never reads half a file


def read_pidfile(path: Path) -> tuple[int, str] | None:
    try:
        pid_line, url, *_ = path.read_text().splitlines()
        return int(pid_line), url
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) or "  | (log is empty)"


# --- processes -----------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """A system user to run a server as (Postgres refuses to run as root)."""

    name: str
    uid: int
    gid: int


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
        return
    # A child of ours that we lost track of: collect it if it has exited.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def pid_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # Orphans whose parent does not reap (PID 1 in many containers) linger as
    # zombies: dead for our purposes.
    return _proc_state(pid) != "Z"


def is_our_server(pid: int, kind: ServiceKind, port: int) -> bool:
    """The pid is alive and still the server we started (pids get reused)."""
    if not pid_running(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True  # no /proc (macOS): trust the pid
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return bool(argv) and Path(argv[0]).name == kind.program and str(port) in " ".join(argv)


def spawn(
    argv: Sequence[str],
    *,
    log: Path,
    cwd: Path,
    run_as: RunAs | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server detached from the caller's terminal session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== sluice local: {' '.join(argv)} at {time.ctime()} ===\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # A new session: closing the shell that ran `sluice local up` sends
            # no SIGHUP to the servers; they run until `sluice local down`.
            start_new_session=True,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
        )
    _children[proc.pid] = proc
    return proc


def stop_pid(pid: int, sig: signal.Signals, *, name: str, timeout: float = 15.0) -> None:
    """Send ``sig``, wait for the exit; SIGKILL if it takes longer than ``timeout``."""
    for current, wait_s in ((sig, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, current)
        except ProcessLookupError:
            _reap(pid)
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not pid_running(pid):
                return
            time.sleep(0.02)
    raise LocalStackError(f"{name} (pid {pid}) did not exit even after SIGKILL")


@dataclass
class RunningService:
    """A service the stack uses: started or reused here (with a pid), or configured."""

    name: str
    url: str
    pid: int | None
    origin: Origin = "started"
    pidfile: Path | None = None
    log: Path | None = None
    ready_s: float | None = field(default=None, compare=False)

    def stop(self) -> None:
        """Stop the server and wait for it to exit; a configured service is left alone."""
        if self.pid is None:
            return
        kind = KINDS[self.name]
        port = host_port(self.url, kind.standard_port)[1]
        if is_our_server(self.pid, kind, port):
            stop_pid(self.pid, kind.stop_signal, name=self.name)
        if self.pidfile is not None:
            recorded = read_pidfile(self.pidfile)
            if recorded is None or recorded[0] == self.pid:
                self.pidfile.unlink(missing_ok=True)


# --- readiness -----------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop.

    The probes use the asyncio clients (nats-py, aiokafka); a fresh loop in a
    worker thread keeps them usable from sync fixtures and from async tests.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-probe") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def wait_ready(
    kind: ServiceKind,
    proc: subprocess.Popen[bytes],
    probe: Callable[[], None],
    *,
    log: Path,
    timeout: float,
) -> None:
    """Poll ``probe`` until it passes.

    Fails fast when the process exits, and on timeout; both errors carry the
    end of the service's log, which is where the reason is.
    """
    started = time.monotonic()
    last_error: Exception | None = None
    while True:
        code = proc.poll()
        if code is not None:
            raise LocalStackError(
                f"the local {kind.name} exited with code {code} before it was ready. "
                f"Last lines of {log}:\n{log_tail(log)}"
            )
        try:
            probe()
            return
        except Exception as exc:  # any failure just means "not ready yet"
            last_error = exc
        if time.monotonic() - started > timeout:
            raise LocalStackError(
                f"the local {kind.name} (pid {proc.pid}) was not ready after {timeout:.0f}s "
                f"(last check: {last_error!r}). Last lines of {log}:\n{log_tail(log)}"
            )
        time.sleep(0.05)


def launch(
    kind: ServiceKind,
    argv: Sequence[str],
    *,
    port: int,
    home: Path,
    url: str,
    probe: Callable[[], None],
    timeout: float,
    cwd: Path,
    run_as: RunAs | None = None,
    env: Mapping[str, str] | None = None,
    since: float | None = None,
) -> RunningService:
    """Spawn, record the pid file, wait until ready; on any failure leave nothing running.

    ``ready_s`` on the result is the time from ``since`` (a ``time.monotonic()``
    taken before any preparation such as initdb; default: the spawn) to ready.
    """
    since = time.monotonic() if since is None else since
    pidfile = pid_path(home, kind)
    refuse_second_instance(kind, pidfile)
    ensure_port_free(kind, port)
    log = log_path(home, kind)
    proc = spawn(argv, log=log, cwd=cwd, run_as=run_as, env=env)
    write_pidfile(pidfile, proc.pid, url)
    service = RunningService(kind.name, url, proc.pid, "started", pidfile, log)
    try:
        wait_ready(kind, proc, probe, log=log, timeout=timeout)
        service.ready_s = time.monotonic() - since
    except BaseException:
        with contextlib.suppress(LocalStackError):
            stop_pid(proc.pid, kind.stop_signal, name=kind.name, timeout=5.0)
        pidfile.unlink(missing_ok=True)
        raise
    return service


def refuse_second_instance(kind: ServiceKind, pidfile: Path) -> None:
    """One server of a kind per home: a second would orphan the first's pid file."""
    recorded = read_pidfile(pidfile)
    if recorded is None:
        return
    pid, url = recorded
    if is_our_server(pid, kind, host_port(url, kind.standard_port)[1]):
        raise LocalStackError(
            f"a local {kind.name} is already running from {pidfile} (pid {pid}, {url}); "
            "stop it first with `sluice local down`"
        )
    pidfile.unlink(missing_ok=True)  # stale: its process is gone
