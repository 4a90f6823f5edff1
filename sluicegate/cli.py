"""The ``sluice`` command line: the root group, settings loading and error rendering.

Each command group lives in its own module (``sluicegate/cli_<group>.py``) and
is registered in ``COMMANDS`` by import path. A group is imported only when it
is invoked (or listed by ``--help``), so ``sluice local status`` does not pay
for importing Kafka, Faust or OpenTelemetry. To add a group, write the module
and add one line to ``COMMANDS``; use ``load_settings`` and ``transport_option``
from here so every command reads settings and reports bad ones the same way.

Exit codes: 0 success; 1 the command failed (a service down, a check failed);
2 a bad setting or flag, reported on one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError as PydanticSettingsError

from sluicegate.cli_errors import (
    debug_requested,
    describe,
    one_line,
    quiet_duplicates,
    traceback_text,
    with_local_hint,
)
from sluicegate.settings import Settings

# name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, str] = {
    "approvals": "sluicegate.cli_approvals:approvals",
    "audit": "sluicegate.cli_audit:audit",
    "bench": "sluicegate.cli_bench:bench",
    "db": "sluicegate.cli_db:db",
    "demo": "sluicegate.cli_demo:demo",
    "dlq": "sluicegate.cli_dlq:dlq",
    "keys": "sluicegate.cli_keys:keys",
    "local": "sluicegate.cli_local:local",
    "offsets": "sluicegate.cli_offsets:offsets",
    "policy": "sluicegate.cli_policy:policy",
    "publish": "sluicegate.cli_publish:publish",
    "run": "sluicegate.cli_run:run",
    "serve": "sluicegate.cli_serve:serve",
    "status": "sluicegate.cli_status:status",
    "tail": "sluicegate.cli_tail:tail",
}

F = TypeVar("F", bound=Callable[..., Any])


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, from ``COMMANDS``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sluicegate", prog_name="sluice")
def cli() -> None:
    """sluicegate: policy-aware stream processing for AI agents, on NATS or Kafka.

    Every command reads SLUICE_* environment variables: SLUICE_TRANSPORT
    (nats|kafka), SLUICE_NATS_URL, SLUICE_KAFKA_BOOTSTRAP, SLUICE_DATABASE_URL,
    SLUICE_TOPIC_PREFIX, SLUICE_PARTITIONS, SLUICE_OTLP_ENDPOINT. An unset
    service URL means the local stack (see `sluice local --help`).
    """


# --- settings -------------------------------------------------------------------------


class BadSettingError(click.UsageError):
    """A SLUICE_* variable (or the flag that overrides it) has an invalid value."""

    exit_code = 2


def load_settings(**overrides: Any) -> Settings:
    """Settings from SLUICE_* variables, with flag values (not None) taking precedence.

    Pass flags by field name, e.g. ``load_settings(transport=transport)``; an
    invalid one is reported as ``--transport``, an invalid variable by its name.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    ctx = click.get_current_context(silent=True)
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise BadSettingError(describe_validation_error(exc, given), ctx) from None
    except PydanticSettingsError as exc:  # e.g. a value that is not valid JSON
        raise BadSettingError(str(exc), ctx) from None


def describe_validation_error(exc: ValidationError, flags: Mapping[str, Any]) -> str:
    """One line naming each bad variable or flag, its value and what is wrong."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = (
            f"--{field.replace('_', '-')}"
            if field in flags
            else f"{Settings.model_config.get('env_prefix', '')}{field.upper()}"
        )
        problems.append(f"{name}={error.get('input')!r}: {error['msg']}")
    return "invalid setting " + "; ".join(problems)


def transport_option(func: F) -> F:
    """``--transport nats|kafka``, overriding SLUICE_TRANSPORT for one command."""
    decorator = click.option(
        "--transport",
        type=click.Choice(["nats", "kafka"]),
        default=None,
        help="Broker to use (default: SLUICE_TRANSPORT, else nats).",
    )
    return decorator(func)


# --- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sluice``; return the exit code (the console script passes it to sys.exit)."""
    quiet_duplicates()
    try:
        result = cli.main(args=argv, prog_name="sluice", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # a bare group: its help, as click does it
        return exc.exit_code
    except click.UsageError as exc:
        click.echo(_one_line_usage_error(exc), err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"sluice: error: {with_local_hint(one_line(exc.format_message()))}", err=True)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("sluice: aborted", err=True)
        return 1
    except Exception as exc:
        # Every other failure, of every command: one line, never a traceback
        # (unless SLUICE_DEBUG asks for one), see cli_errors.
        failure = describe(exc)
        if debug_requested():
            click.echo(traceback_text(exc), err=True, nl=False)
        click.echo(f"sluice: error: {failure.line}", err=True)
        return failure.exit_code
    # standalone_mode=False returns ctx.exit()'s code, or the command's return value.
    return result if isinstance(result, int) else 0


def _one_line_usage_error(exc: click.UsageError) -> str:
    command = exc.ctx.command_path if exc.ctx is not None else "sluice"
    message = " ".join(exc.format_message().split())  # click may wrap long messages
    return f"{command}: error: {message} (see '{command} --help')"
