"""``/healthz``, ``/readyz`` and ``/metrics`` on a worker's metrics port.

``/healthz`` answers 200 while the process serves at all (a liveness probe);
``/readyz`` answers 200 once every step runner of this process is subscribed
and has been offered its partitions (a Kafka group assignment, NATS leases,
or a fixed ``--instance`` set) and loaded them, 503 before that and after
shutdown. The runners are registered by ``worker_log.reporting``; the HTTP
server runs in a thread, so it reads plain attributes only.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server


class _Ready(Protocol):
    @property
    def ready(self) -> bool: ...


_runners: list[_Ready] = []
_lock = threading.Lock()


def track(runners: Iterable[_Ready]) -> None:
    with _lock:
        _runners.extend(runners)


def untrack(runners: Iterable[_Ready]) -> None:
    gone = {id(r) for r in runners}
    with _lock:
        _runners[:] = [r for r in _runners if id(r) not in gone]


def readiness() -> tuple[bool, str]:
    """Whether this worker is ready, and a short why."""
    with _lock:
        runners = list(_runners)
    if not runners:
        return False, "no step runners yet"
    waiting = [getattr(getattr(r, "processor", None), "name", "?") for r in runners if not r.ready]
    if waiting:
        return False, "waiting for partitions: " + ",".join(waiting)
    reasons = _runtime_reasons()
    if reasons:
        return False, "; ".join(reasons)
    return True, f"{len(runners)} step runner(s) ready"


def _runtime_reasons() -> list[str]:
    """What the runners report keeps them from working (outages, stalls), if they report it."""
    try:
        # Looked up by name: the runtime's registry of not-ready reasons
        # (streams.health) is newer than this module and may be absent.
        registry = importlib.import_module("sluicegate.streams.health")
    except ImportError:
        return []
    not_ready = getattr(registry, "not_ready", None)
    return list(not_ready()) if callable(not_ready) else []


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def health_app(metrics_app: WsgiApp) -> WsgiApp:
    """``metrics_app`` with ``/healthz`` and ``/readyz`` in front of it."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            ready, why = readiness()
            return _text(start_response, "200 OK" if ready else "503 Service Unavailable", why)
        return metrics_app(environ, start_response)

    return app


def _text(start_response: Callable[..., Any], status: str, body: str) -> Sequence[bytes]:
    data = (body + "\n").encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds must not fill the worker's log."""


def serve(host: str, port: int, registry: Any) -> Any:
    """Serve metrics of ``registry`` plus the probes on ``host:port``, in a daemon thread."""
    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    server = make_server(
        host,
        port,
        health_app(make_wsgi_app(registry)),
        ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    return server
