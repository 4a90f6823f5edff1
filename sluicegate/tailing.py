"""The engine behind ``sluice tail``: read a topic as an observer, filter, and render events.

This module owns how one consumed message is looked at (``inspect``), the
filters, the two output formats (``render_json``: the CloudEvent as on the
wire; ``render_line``: one readable line) and the follow loop. The command
(``sluicegate.cli_tail``) owns flags, signals and exit codes.

Nothing here assumes a message is a valid event: ``dlq`` holds exactly the
messages that are not, and a foreign producer may write anything. Bodies are
parsed leniently (any JSON object will do) and every piece of text is made
safe for a terminal before it is printed.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sluicegate.streams.codec import H_TYPE
from sluicegate.streams.runner import (
    DLQ_TOPIC,
    H_DLQ_ERROR,
    H_DLQ_MESSAGE,
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    H_DLQ_STEP,
)
from sluicegate.streams.transport import Message, Subscription

# Dead-letter headers under short names, for --json and the readable line.
DLQ_FIELDS: tuple[tuple[str, str], ...] = (
    ("reason", H_DLQ_REASON),
    ("error", H_DLQ_ERROR),
    ("message", H_DLQ_MESSAGE),
    ("step", H_DLQ_STEP),
    ("source", H_DLQ_SOURCE),
)
SUMMARY_CHARS = 100
BODY_PREVIEW_BYTES = 60


@dataclass(frozen=True, slots=True)
class Seen:
    """One consumed message as tail sees it.

    ``body`` is the parsed JSON object, or None with ``problem`` saying why
    not. ``tenant``/``session``/``type`` come from the body when it has them;
    otherwise the session from the message key (the partition key is the
    session) and the type from the ``ce_type`` header, so filters still work
    on an unparseable dead letter.
    """

    message: Message
    body: dict[str, Any] | None
    problem: str | None
    tenant: str | None
    session: str | None
    type: str | None


def inspect(message: Message) -> Seen:
    body: dict[str, Any] | None = None
    problem: str | None = None
    try:
        parsed = orjson.loads(message.value)
    except orjson.JSONDecodeError as exc:
        problem = f"not JSON: {exc}"
    else:
        if isinstance(parsed, dict):
            body = parsed
        else:
            problem = f"a JSON {type(parsed).__name__}, not an object"
    fields = body or {}
    key = message.key.decode(errors="replace") if message.key else None
    return Seen(
        message=message,
        body=body,
        problem=problem,
        tenant=_text(fields.get("tenant")),
        session=_text(fields.get("session")) or key,
        type=_text(fields.get("type")) or message.headers.get(H_TYPE),
    )


@dataclass(frozen=True, slots=True)
class Filter:
    """Exact matches on tenant, session and type, and a broker time lower bound.

    None matches anything. ``since_ms`` compares the broker's timestamp of
    the message (milliseconds since the epoch), which every message has,
    not the event's ``time``, which a dead letter may lack.
    """

    tenant: str | None = None
    session: str | None = None
    type: str | None = None
    since_ms: int | None = None

    def __call__(self, seen: Seen) -> bool:
        return (
            (self.tenant is None or seen.tenant == self.tenant)
            and (self.session is None or seen.session == self.session)
            and (self.type is None or seen.type == self.type)
            and (self.since_ms is None or seen.message.timestamp_ms >= self.since_ms)
        )


# --- --json -------------------------------------------------------------------------


def render_json(seen: Seen) -> str:
    """One line of JSON.

    An event is printed as the CloudEvent it is on the wire, plus its
    ``partition`` and ``offset``. A dead letter is
    ``{"dlq": {reason, error, message, step, source}, "event": ...}``, since
    what went wrong travels in headers; a body that is not a JSON object is
    given as ``body`` (text) or ``body_base64`` (not UTF-8) instead of
    ``event``, with ``problem`` saying why.
    """
    message = seen.message
    if message.topic != DLQ_TOPIC and seen.body is not None:
        # Where it sits, beside its attributes (valid CloudEvents extension names).
        placed = {**seen.body, "partition": message.partition, "offset": message.offset}
        return orjson.dumps(placed).decode()
    out: dict[str, Any] = {}
    if message.topic == DLQ_TOPIC:
        out["dlq"] = {name: message.headers.get(header) for name, header in DLQ_FIELDS}
    if seen.body is not None:
        out["event"] = seen.body
    else:
        out["problem"] = seen.problem
        out["headers"] = dict(message.headers)
        try:
            out["body"] = message.value.decode()
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(message.value).decode()
    out["partition"] = message.partition
    out["offset"] = message.offset
    return orjson.dumps(out).decode()


# --- the readable line --------------------------------------------------------------


def render_line(seen: Seen) -> str:
    """``time  partition:offset  type  tenant/session  short-id  summary``, terminal-safe."""
    body = seen.body or {}
    when = _when(body.get("time"), seen.message.timestamp_ms)
    who = f"{seen.tenant or '?'}/{seen.session or '?'}"
    ident = _short_id(_text(body.get("id")) or seen.message.headers.get("ce_id"))
    if seen.message.topic == DLQ_TOPIC:
        kind = f"dlq:{seen.message.headers.get(H_DLQ_REASON) or '?'}"
        summary = _dlq_summary(seen)
    else:
        kind = seen.type or "?"
        summary = summarize(seen.type, body.get("data")) if seen.body else _poison(seen)
    where = f"{seen.message.partition}:{seen.message.offset}"
    parts = [when, where, _safe(kind, 40), _safe(who, 60), ident, summary]
    return "  ".join(part for part in parts if part)


def summarize(event_type: str | None, data: object) -> str:
    """A short, type-aware summary of ``data`` (never raises on odd shapes)."""
    d = _mapping(data)
    text: str
    if event_type in ("task.submitted", "task.accepted"):
        text = str(d.get("prompt", ""))
    elif event_type == "context.packed":
        task, history = _mapping(d.get("task")), d.get("history")
        turns = len(history) if isinstance(history, list) else 0
        text = f"{task.get('prompt', '')} (history {turns})"
    elif event_type in ("action.proposed", "action.allowed", "action.denied"):
        text = f"{_action(d)} {_compact(d.get('args', {}))}"
        reasons = d.get("reasons")
        if event_type == "action.denied" and isinstance(reasons, list) and reasons:
            text = f"{_action(d)} denied: {'; '.join(map(str, reasons))}"
    elif event_type == "tool.result":
        output = _mapping(d.get("output"))
        outcome = (
            f"ok: {output.get('summary', _compact(output))}"
            if d.get("ok")
            else f"error: {d.get('error')}"
        )
        text = f"{_action(d)} {outcome}"
    elif event_type == "task.completed":
        text = f"{d.get('status', '?')}: {_answer_line(d.get('answer'))}"
    else:
        text = _compact(data)
    return _safe(text, SUMMARY_CHARS)


def _action(d: Mapping[str, Any]) -> str:
    index, count = d.get("action_index"), d.get("action_count")
    where = f"#{index + 1}/{count} " if isinstance(index, int) else ""
    return f"{where}{d.get('tool', '?')}"


def _answer_line(answer: object) -> str:
    """The first line that says something the status does not.

    An answer's first line is a headline ("All 2 action(s) succeeded.") that
    repeats the status; the per-action lines after it carry the content.
    """
    text = answer.get("text", "") if isinstance(answer, Mapping) else ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    more = len(lines) - 2
    return lines[1] + (f" (+{more} more)" if more else "")


def _dlq_summary(seen: Seen) -> str:
    headers = seen.message.headers
    step = headers.get(H_DLQ_STEP) or "?"
    source = headers.get(H_DLQ_SOURCE) or "?"
    what = headers.get(H_DLQ_MESSAGE) or ""
    original = f"{seen.type} " if seen.body is not None and seen.type else ""
    head = _safe(f"step={step} from={source} {original}{what}", SUMMARY_CHARS)
    return f"{head}  body={_preview(seen.message.value)}"


def _poison(seen: Seen) -> str:
    return f"undecodable ({_safe(seen.problem or '', 60)}) body={_preview(seen.message.value)}"


def _preview(value: bytes) -> str:
    # repr() of bytes is printable ASCII whatever the body holds.
    shown = repr(value[:BODY_PREVIEW_BYTES])
    return shown + (f"… ({len(value)} bytes)" if len(value) > BODY_PREVIEW_BYTES else "")


def _when(value: object, timestamp_ms: int) -> str:
    moment: datetime | None = None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
    try:
        if moment is None or moment.tzinfo is None:
            moment = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, ValueError, OSError):  # e.g. year 9999 at +14:00
        return _safe(str(value), 40) if isinstance(value, str) else "-"


def _short_id(event_id: str | None) -> str:
    # Ids are UUIDv7: the leading hex is the timestamp, shared by a burst;
    # the tail differs from event to event.
    if not event_id:
        return "-"
    return _safe(event_id[-8:], 8)


def _compact(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _safe(text: str, limit: int) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters.

    Event text comes from anyone who can publish: an escape sequence in a
    prompt must not drive the operator's terminal.
    """
    clean = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def renderer(as_json: bool) -> Callable[[Seen], str]:
    """The line renderer for the chosen format, which never raises.

    A message shaped like nothing expected must not end a tail: it is shown
    by position and a preview of its bytes instead.
    """
    render = render_json if as_json else render_line

    def safely(seen: Seen) -> str:
        try:
            return render(seen)
        except Exception as exc:
            m = seen.message
            if as_json:
                fallback = {
                    "problem": f"cannot render: {exc!r}",
                    "body_base64": base64.b64encode(m.value).decode(),
                    "partition": m.partition,
                    "offset": m.offset,
                }
                return orjson.dumps(fallback).decode()
            where = f"{m.topic}/{m.partition}/{m.offset}"
            return f"{where}  cannot render ({type(exc).__name__})  body={_preview(m.value)}"

    return safely


# --- the follow loop ----------------------------------------------------------------


async def follow(
    subscription: Subscription,
    *,
    match: Callable[[Seen], bool],
    emit: Callable[[Seen], None],
    flush: Callable[[], None],
    stop: asyncio.Event,
    count: int | None = None,
    poll_s: float = 0.25,
) -> int:
    """Emit matching messages until ``count`` were shown or ``stop`` is set; returns how many.

    Fetches are short so ``stop`` (a signal) is noticed within ``poll_s``
    without cancelling a fetch half-way. Nothing is committed: an observer
    subscription moves no offsets.
    """
    shown = 0
    while not stop.is_set():
        batch = await subscription.fetch(500, poll_s)
        for message in batch:
            seen = inspect(message)
            if not match(seen):
                continue
            emit(seen)
            shown += 1
            if count is not None and shown >= count:
                flush()
                return shown
        if batch:
            flush()  # a pipe sees each batch as it arrives, not when a buffer fills
    return shown
