"""Dead letters: the ``dlq`` message and the audit row for an input that cannot be processed.

A dead letter keeps the original bytes as its body, so the poisoned message
is preserved exactly; what went wrong travels in the ``sluice-dlq-*``
headers. A valid envelope keeps its identity (``ce_id``, ``traceparent``) in
the dead letter, so the audit trail finds it by session and a replay is
deduped.
"""

from __future__ import annotations

import orjson

from sluicegate.streams.codec import DecodeError
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import AuditRecord, trace_id_of
from sluicegate.streams.transport import Message, OutMessage

DLQ_TOPIC = "dlq"
H_DLQ_REASON = "sluice-dlq-reason"
H_DLQ_ERROR = "sluice-dlq-error"
H_DLQ_MESSAGE = "sluice-dlq-message"
H_DLQ_STEP = "sluice-dlq-step"
H_DLQ_SOURCE = "sluice-dlq-source"  # topic/partition/offset of the original
# On a dead letter's original bytes republished by `sluice dlq replay`: which
# replay this is. The runner processes such a message even though its id was
# dead-lettered before (once: a second copy is absorbed); on NATS it also
# makes the message id new, so JetStream's duplicate window keeps it.
H_REPLAY = "sluice-replay"

MAX_MESSAGE_CHARS = 1000


def error_text(error: BaseException) -> str:
    """What the dead letter says went wrong, bounded."""
    return (error.detail if isinstance(error, DecodeError) else str(error))[:MAX_MESSAGE_CHARS]


def event_fields(value: bytes) -> dict[str, str]:
    """``type``, ``tenant`` and ``session`` of a body that is a JSON object, where they are text."""
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(body, dict):
        return {}
    wanted = ("type", "tenant", "session")
    return {name: body[name][:200] for name in wanted if isinstance(body.get(name), str)}


def dead_letter(
    msg: Message, step: str, reason: str, error: BaseException, event: Event | None
) -> tuple[OutMessage, AuditRecord]:
    """The ``dlq`` message and the audit row for ``msg``."""
    text = error_text(error)
    source = f"{msg.topic}/{msg.partition}/{msg.offset}"
    headers = {
        H_DLQ_REASON: reason,
        H_DLQ_ERROR: type(error).__name__,
        H_DLQ_MESSAGE: text,
        H_DLQ_STEP: step,
        H_DLQ_SOURCE: source,
    }
    if event is not None:
        headers["ce_id"] = event.id
        if event.traceparent:
            headers["traceparent"] = event.traceparent
    # An input that is not an event may still say whose it is: the audit
    # trail then finds its dead letter by tenant and session.
    found = event_fields(msg.value) if event is None else {}
    row = AuditRecord(
        kind="dead_letter",
        step=step,
        event_id=event.id if event else source,
        event_type=event.type if event else found.get("type", ""),
        tenant=event.tenant if event else found.get("tenant", ""),
        session=event.session if event else found.get("session", ""),
        causation_id=event.causationid if event else None,
        reasons=(reason,),
        trace_id=trace_id_of(event.traceparent) if event else None,
        detail={
            "error": type(error).__name__,
            "message": text,
            "topic": msg.topic,
            "partition": msg.partition,
            "offset": msg.offset,
        },
    )
    return OutMessage(DLQ_TOPIC, msg.value, key=msg.key, headers=headers), row
