"""``sluice audit export --format opa`` read back as OPA's decision logs are documented.

The reader below is written from OPA's documentation of decision-log events
(management-decision-logs: the field table), not from our exporter: every
field must be a documented one with the documented type, ``timestamp``
RFC 3339, ``masked`` and ``erased`` JSON pointers (RFC 6901) into the event.
The decisions come from the real pipeline (NATS, Postgres).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from sluicegate.cli_audit import audit
from sluicegate.streams.envelope import Event
from tests.integration.pipeline_support import (
    env_for,
    prepare_database,
    publish_events,
    running_pipeline,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration

# OPA's documented decision-log event fields and their JSON types.
DOCUMENTED: dict[str, type | tuple[type, ...] | None] = {
    "labels": dict,
    "decision_id": str,
    "trace_id": str,
    "span_id": str,
    "bundles": dict,
    "path": str,
    "query": str,
    "input": None,  # any JSON
    "result": None,  # any JSON
    "intermediate_results": dict,
    "requested_by": str,
    "timestamp": str,
    "metrics": dict,
    "erased": list,
    "masked": list,
    "nd_builtin_cache": dict,
    "req_id": int,
    "request_context": dict,
    "custom": dict,
}


@dataclass(frozen=True)
class DecisionEvent:
    decision_id: str
    path: str
    revision: dict[str, str]
    input: Any
    result: Any
    timestamp: datetime
    masked: list[str]
    raw: dict[str, Any]


def resolve(doc: Any, ptr: str) -> Any:
    """The value at JSON pointer ``ptr`` (RFC 6901) in ``doc``; KeyError if absent."""
    assert ptr.startswith("/"), ptr
    for token in ptr[1:].split("/"):
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, list):
            doc = doc[int(key)]
        elif isinstance(doc, dict):
            doc = doc[key]
        else:
            raise KeyError(ptr)
    return doc


def read_decision_log(text: str) -> list[DecisionEvent]:
    """Parse newline-delimited decision-log events, holding each to OPA's field table."""
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        doc = orjson.loads(line)
        assert isinstance(doc, dict), line
        for name, value in doc.items():
            assert name in DOCUMENTED, f"undocumented field {name!r}"
            kind = DOCUMENTED[name]
            assert kind is None or isinstance(value, kind), f"{name} is {type(value).__name__}"
        assert doc["decision_id"], "decision_id is required"
        labels = doc.get("labels", {})
        assert all(isinstance(v, str) for v in labels.values()), labels
        revisions = {}
        for bundle, info in doc.get("bundles", {}).items():
            assert isinstance(info, dict) and isinstance(info.get("revision"), str), info
            revisions[bundle] = info["revision"]
        stamp = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
        assert stamp.tzinfo is not None
        for ptr in doc.get("masked", []):
            resolve(doc, ptr)  # a masked field is there, with its masked value
        for ptr in doc.get("erased", []):
            with pytest.raises((KeyError, IndexError)):
                resolve(doc, ptr)  # an erased one is gone
        events.append(
            DecisionEvent(
                decision_id=doc["decision_id"],
                path=doc["path"],
                revision=revisions,
                input=doc.get("input"),
                result=doc.get("result"),
                timestamp=stamp,
                masked=list(doc.get("masked", [])),
                raw=doc,
            )
        )
    return events


def task(session: str, prompt: str) -> Event:
    data = {"prompt": prompt}
    return Event(source="tests", type="task.submitted", tenant="acme", session=session, data=data)


async def test_export_reads_back_as_opa_decision_logs(
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    monkeypatch.setenv("SLUICE_APPROVAL_TIMEOUT", "1")
    tasks = [
        task("pii", "email alice@example.com the summary"),
        task("deny", "run shell: rm -rf /"),
        task("hold", "refund 250 for order X-1"),
    ]
    started = datetime.now(UTC)
    async with running_pipeline(settings):
        await publish_events(settings, tasks)
        assert await wait_for_results(settings, 3, timeout_s=60) == 3, "no results in 60 s"

    def export(*args: str) -> str:
        result = CliRunner().invoke(
            audit, ["export", "--format", "opa", *args], env=env_for(settings)
        )
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    text = await asyncio.to_thread(export)
    assert "alice@example.com" not in text
    events = {e.input["session"]: e for e in read_decision_log(text)}
    assert set(events) == {"pii", "deny", "hold"}
    for e in events.values():
        assert e.path == "sluice/gate/decision"
        assert e.revision["sluice"].startswith("sha256:")
        assert e.timestamp >= started.replace(microsecond=0)
    pii = events["pii"]
    assert pii.result["decision"] == "redact"
    assert pii.masked == ["/input/args/text", "/input/args/to"]
    assert resolve(pii.raw, "/input/args/to") == "[email]"
    assert "[email]" in pii.input["args"]["text"]
    assert events["deny"].result["reasons"] == ["dangerous_tool", "tool_not_allowed"]
    assert events["hold"].result == {
        "decision": "hold",
        "reasons": ["refund_over_threshold"],
        "cost": 1,
        "masks": [],
    }
    assert events["hold"].input["args"] == {"amount": 250, "order": "X-1"}
    # --since in the future: nothing.
    assert await asyncio.to_thread(export, "--since", "2999-01-01T00:00:00Z") == ""
    bad = await asyncio.to_thread(
        CliRunner().invoke, audit, ["export", "--format", "xml"], env=env_for(settings)
    )
    assert bad.exit_code == 2
