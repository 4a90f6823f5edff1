"""``sluice policy check|test``: vet a policy bundle, and try it on inputs.

Thin: the checks live in ``policy.lint``, the deciding in
``policy.evaluator``; this module parses flags and lines and prints.
``BUNDLE`` defaults to the reference policies shipped in ``policy/rego``.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import click
import orjson

from sluicegate.policy import lint
from sluicegate.policy.bundle import BundleError, default_bundle_path
from sluicegate.policy.decision import Decision
from sluicegate.policy.engine import PolicyCompileError
from sluicegate.policy.evaluator import LoadedPolicy, Request
from sluicegate.policy.lines import Line, LineError, parse_line

_BUNDLE = click.argument(
    "bundle",
    required=False,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)


@click.group()
def policy() -> None:
    """Policy bundles: a directory of .rego files plus data.json.

    BUNDLE defaults to the reference policies shipped with sluicegate.
    """


@policy.command("check")
@_BUNDLE
def check_command(bundle: Path | None) -> None:
    """Compile and lint BUNDLE, run its Rego tests, print its version.

    Fails (exit 1) when the bundle does not load or compile, when the policy
    reads an input field the gate does not pass, when its decision for a
    sample input is malformed, or when a test_* rule of a *_test.rego file
    is not true.
    """
    path = bundle or default_bundle_path()
    report = lint.check(path)
    click.echo(f"bundle:  {path}")
    if report.version:
        click.echo(f"version: {report.version}")
    if report.engine:
        click.echo(f"engine:  {report.engine}")
    for test in report.tests:
        if not test.passed:
            click.echo(f"FAIL {test.name}: {test.message}")
    if report.tests:
        passed = sum(t.passed for t in report.tests)
        click.echo(f"tests:   {passed} passed, {len(report.tests) - passed} failed")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    for error in report.errors:
        click.echo(f"error:   {error}")
    if not report.ok:
        raise click.ClickException(f"policy bundle {path} failed its checks")
    click.echo("ok")


@policy.command("test")
@_BUNDLE
@click.option(
    "--input",
    "input_file",
    type=click.File("r"),
    required=True,
    help="JSON lines ('-' for stdin), each an action, an action.proposed event or a policy input.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--tenant",
    default="default",
    show_default=True,
    help="Tenant of action lines (event and input lines carry their own).",
)
@click.option("--spend", type=float, default=0.0, help="Session spend so far, for action lines.")
@click.option("--calls", type=int, default=0, help="Calls in the rate window, for action lines.")
def test_command(
    bundle: Path | None,
    input_file: IO[str],
    as_json: bool,
    tenant: str,
    spend: float,
    calls: int,
) -> None:
    """Print BUNDLE's decision for each line of --input, in the spirit of `opa eval`.

    Each line is exactly one of three shapes, and the output names it:

    \b
    action  {"tool": "http_get", "args": {"url": "..."}, "agent": "assistant"}
            a proposed tool call (action.proposed data; task_id and the
            other data fields may be there too). --tenant, --spend and
            --calls fill in the rest, as the gate would; the output shows
            the arguments after redaction. A "usage" of the action
            ({"total_tokens", "session_total_tokens"}) is decided on too.
    event   {"type": "action.proposed", "tenant": "acme", "data": {action}}
    input   the policy input document as the gate builds it, with all of
            tenant, agent, tool, args, args_kib, url_host, pii (a list of
            {"kind", "path", "match"[, "digits", "luhn"]}), spend,
            calls_in_window; evaluated as given.

    A line that matches no shape, or lacks a field of its shape, is an
    error naming what is wrong (exit 1), never a decision.
    """
    path = bundle or default_bundle_path()
    try:
        loaded = LoadedPolicy.load(path)
    except (BundleError, PolicyCompileError) as exc:
        raise click.ClickException(f"policy bundle {path}: {exc}") from None
    if not as_json:
        click.echo(f"# bundle {path} {loaded.version} ({loaded.engine.mode})", err=True)
    failures = 0
    for number, text in enumerate(input_file, start=1):
        if not text.strip():
            continue
        try:
            line = parse_line(orjson.loads(text))
            row = _decide_line(loaded, line, tenant, _number(spend), calls)
        except (orjson.JSONDecodeError, LineError) as exc:
            failures += 1
            message = " ".join(str(exc).split())
            click.echo(f"line {number}: error: {message}", err=True)
            continue
        click.echo(orjson.dumps(row).decode() if as_json else _text(row))
    if failures:
        raise click.ClickException(f"{failures} input line(s) could not be decided")


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _decide_line(
    loaded: LoadedPolicy, line: Line, tenant: str, spend: int | float, calls: int
) -> dict[str, Any]:
    if line.shape == "input":
        assert line.document is not None
        return _row(loaded.evaluate_input(line.document), args=None, shape=line.shape)
    action = line.action
    assert action is not None
    verdict = loaded.decide(
        Request(
            tenant=line.tenant or tenant,
            agent=action.agent,
            tool=action.tool,
            args=action.args,
            spend=spend,
            calls_in_window=calls,
            usage=action.usage,
        )
    )
    return _row(verdict.decision, args=verdict.args, shape=line.shape)


def _row(decision: Decision, *, args: dict[str, Any] | None, shape: str) -> dict[str, Any]:
    row = {"shape": shape, **decision.summary()}
    if args is not None:
        row["args"] = args
    return row


def _text(row: dict[str, Any]) -> str:
    parts = [f"{row['shape']:<6}", f"{row['decision']:<6}"]
    if row["reasons"]:
        parts.append(",".join(row["reasons"]))
    if "cost" in row:
        parts.append(f"cost={row['cost']}")
    if "args" in row:
        parts.append(f"args={orjson.dumps(row['args']).decode()}")
    elif row.get("masks"):
        parts.append(f"masks={orjson.dumps(row['masks']).decode()}")
    if row.get("error"):
        parts.append(f"({row['error']})")
    return " ".join(parts)
