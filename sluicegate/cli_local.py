"""``sluice local up|down|reset|status``: the local stack from the command line.

Thin: the work is in ``sluicegate.localstack``; this module parses flags,
loads settings and prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import click

from sluicegate import localstack
from sluicegate.cli import BadSettingError, load_settings
from sluicegate.localstack import InvalidSettingError, LocalStackError, RunningService

services_argument = click.argument(
    "services", nargs=-1, type=click.Choice(localstack.SERVICE_NAMES), metavar="[SERVICE]..."
)


@click.group(short_help="Run NATS, a Kafka-protocol broker and Postgres locally.")
def local() -> None:
    """Run NATS (JetStream), a Kafka-protocol broker and Postgres locally, without Docker.

    The servers come from PyPI wheels, listen on 127.0.0.1 only, and keep their
    data, logs and pid files under SLUICE_HOME (default .sluice). Ports:
    SLUICE_LOCAL_NATS_PORT (14222), SLUICE_LOCAL_KAFKA_PORT (19092),
    SLUICE_LOCAL_POSTGRES_PORT (15432). A service whose URL is set
    (SLUICE_NATS_URL, SLUICE_KAFKA_BOOTSTRAP, SLUICE_DATABASE_URL) is used
    as it is: checked, never started or stopped; a URL equal to the local
    stack's own address (as `up` prints it) still counts as local.
    """


@local.command(short_help="Start the local servers; print SLUICE_* exports.")
@services_argument
def up(services: tuple[str, ...]) -> None:
    """Start what is not configured or already running; print its SLUICE_* variables.

    Standard output carries only `export SLUICE_...=...` lines, so

        eval "$(sluice local up)"

    starts the stack and points this shell at it. Progress goes to standard
    error. Running it again reuses the running servers. SERVICES limits it
    to some of: nats, kafka, postgres (default: all).
    """
    settings = load_settings()
    with reported_errors():
        running = localstack.up(settings, services or None)
    for service in running:
        click.echo(_describe(service), err=True)
    for line in localstack.env_lines(running):
        click.echo(line)


@local.command(short_help="Stop the local servers.")
@services_argument
def down(services: tuple[str, ...]) -> None:
    """Stop the local servers `sluice local up` started (configured ones are never touched).

    Data stays under SLUICE_HOME (Postgres, JetStream); Kafka-protocol topics
    live in memory and are gone. SERVICES limits it to some of: nats, kafka, postgres.
    """
    settings = load_settings()
    with reported_errors():
        stopped = localstack.down(settings, services or None)
    for service in stopped:
        click.echo(f"stopped {service.name} (pid {service.pid}, {service.url})")
    if not stopped:
        click.echo("nothing to stop: no local server is running")


@local.command(short_help="Stop the local servers, delete their data, start them afresh.")
@services_argument
@click.option("--yes", is_flag=True, help="Do not ask; needed without a terminal.")
def reset(services: tuple[str, ...], yes: bool) -> None:
    """Delete the local servers' data (streams, topics, databases) and start afresh.

    Stops the local servers, removes their data under SLUICE_HOME (logs
    stay), and starts again those that were running, printing their
    SLUICE_* exports as `up` does. Configured services are never touched.
    SERVICES limits it to some of: nats, kafka, postgres.
    """
    settings = load_settings()
    which = ", ".join(services) if services else "nats, kafka, postgres"
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("reset deletes data: pass --yes to confirm without a terminal")
        click.confirm(
            f"Delete the data of the local {which} under {settings.home}?", abort=True, err=True
        )
    with reported_errors():
        wiped = localstack.reset(settings, services or None)
        again = [w.name for w in wiped if w.was_running]
        running = localstack.up(settings, again) if again else []
    for item in wiped:
        click.echo(f"reset {item.name}: freed {item.freed_bytes / 1e6:,.1f} MB", err=True)
    if not wiped:
        click.echo("nothing to reset: every service asked for is configured", err=True)
    for line in localstack.env_lines(running):
        click.echo(line)


@local.command(short_help="Show each service's state, URL and pid.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per service, in a list.")
def status(as_json: bool) -> None:
    """Show each service: configured, running (local) or stopped; its URL and pid."""
    settings = load_settings()
    with reported_errors():
        rows = localstack.status(settings)
    if as_json:
        records = [{**asdict(row), "url": _redact(row.url)} for row in rows]
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(f"{'SERVICE':<9} {'STATE':<11} {'PID':<8} URL")
    for row in rows:
        pid = str(row.pid) if row.pid is not None else "-"
        detail = f"  ({row.detail})" if row.detail else ""
        click.echo(f"{row.name:<9} {row.state:<11} {pid:<8} {_redact(row.url)}{detail}")


@contextmanager
def reported_errors() -> Iterator[None]:
    """A bad SLUICE_* value exits 2 like any bad setting; a failed service exits 1."""
    try:
        yield
    except InvalidSettingError as exc:
        raise BadSettingError(str(exc), click.get_current_context(silent=True)) from None
    except LocalStackError as exc:
        raise click.ClickException(str(exc)) from None


def _describe(service: RunningService) -> str:
    if service.origin == "configured":
        return f"{service.name}: configured, reachable at {_redact(service.url)}"
    took = f" in {service.ready_s:.2f}s" if service.ready_s is not None else ""
    return f"{service.name}: {service.origin}{took}, pid {service.pid}, {service.url}"


def _redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` before printing it."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not (sep and at and ":" in credentials):
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
