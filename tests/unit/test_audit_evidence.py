"""The pure parts of the audit evidence: OPA events from audit rows, seal documents."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sluicegate.sinks import opa_export, seals
from sluicegate.sinks.audit import StoredHead

T = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)


def row(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": T,
        "step": "gate",
        "event_id": "e-1",
        "tenant": "acme",
        "session": "s",
        "decision": "redact",
        "reasons": ["pii_redacted"],
        "policy_version": "sha256:abc",
        "trace_id": None,
        "detail": detail,
    }


def test_opa_event_points_at_masked_arguments() -> None:
    detail = {
        "tool": "echo",
        "agent": "assistant",
        "args": {"a/b": "[email]", "list": ["x", "[phone]"]},
        "masks": [{"path": ["a/b"], "mask": "[email]"}, {"path": ["list", 1], "mask": "[phone]"}],
        "eval_us": 12,
    }
    event = opa_export.event(row(detail), "1.0")
    assert event["masked"] == ["/input/args/a~1b", "/input/args/list/1"]
    assert event["timestamp"] == "2026-12-07T19:00:00.000000Z"
    assert event["bundles"] == {"sluice": {"revision": "sha256:abc"}}
    assert event["metrics"] == {"timer_rego_query_eval_ns": 12000}
    assert "trace_id" not in event


def test_opa_event_of_a_row_without_arguments_says_they_are_erased() -> None:
    event = opa_export.event(row({"tool": "echo"}), "1.0")
    assert event["erased"] == ["/input/args"] and "args" not in event["input"]


def test_seal_document_is_canonical_and_signed_bytes_verify() -> None:
    heads = [StoredHead("tools", 1, 4, "b" * 64), StoredHead("gate", 0, 9, "a" * 64)]
    key = Ed25519PrivateKey.generate()
    doc = seals.document(heads, sealed_at=T, key=seals.key_id(key.public_key()), schema="s")
    parsed = orjson.loads(doc)
    assert [h["step"] for h in parsed["heads"]] == ["gate", "tools"]
    assert doc == orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)
    key.public_key().verify(key.sign(doc), doc)  # raises if not
    assert len(seals.key_id(key.public_key())) == 16
