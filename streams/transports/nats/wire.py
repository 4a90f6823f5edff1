"""What the NATS transport puts on the wire and reads back from it.

It owns the headers (the key header and its encoding, the message id, what
consumers never see), the size check against the server's
``max_payload``, the HPUB command built here instead of by nats-py
(``_hpub``, ``_write_command``), the parsing of status headers and publish
acks, and the per-call state of a pipelined publish (``_PublishBatch``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
from collections.abc import Mapping, Sequence

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from sluicegate.streams.transport import OutMessage, TransportError

KEY_HEADER = "sluice-key"
KEY_B64_HEADER = "sluice-key-b64"
MSG_ID_HEADER = "Nats-Msg-Id"
EVENT_ID_HEADER = "ce_id"
_STATUS_HEADER = "Status"
_DESCRIPTION_HEADER = "Description"
# Headers the server or this module adds; never shown to consumers.
_NATS_HEADER_PREFIX = "Nats-"

# What nats-py accepts as a header name (an HTTP token).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES_TO_SPACES = str.maketrans({"\r": " ", "\n": " "})


# Keys are sessions, which repeat: memoise like partition_for does.
@functools.lru_cache(maxsize=65536)
def encode_key(key: bytes) -> tuple[str, str]:
    """The header carrying ``key``: plain text when it survives NATS headers intact."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        text = ""
    else:
        # nats-py strips values and folds CR/LF, so only keep clean text as is.
        if text and text == text.strip() and text.isprintable():
            return KEY_HEADER, text
    return KEY_B64_HEADER, base64.b64encode(key).decode()


def split_headers(raw: dict[str, str] | None) -> tuple[bytes | None, dict[str, str]]:
    """Take the key out of ``raw`` and return it with what a consumer should see.

    ``raw`` is changed in place: nats-py builds a fresh dict per message, and
    not copying it is a measurable part of the per-message cost.
    """
    if not raw:
        return None, {}
    text = raw.pop(KEY_HEADER, None)
    key = None if text is None else text.encode()
    if KEY_B64_HEADER in raw:
        key = base64.b64decode(raw.pop(KEY_B64_HEADER))
    raw.pop(MSG_ID_HEADER, None)
    internal = [name for name in raw if name.startswith(_NATS_HEADER_PREFIX)]
    for name in internal:
        del raw[name]
    return key, raw


def _check_size(message: OutMessage, headers: Mapping[str, str], max_payload: int) -> None:
    """Refuse what the server would refuse by closing the connection.

    nats-py only compares the body with ``max_payload``, but the server counts
    headers too, drops the connection, and nats-py resends the same message
    after reconnecting.
    """
    header_bytes = 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    size = len(message.value) + header_bytes
    if size > max_payload:
        raise TransportError(
            f"message for topic {message.topic!r} is {size} bytes with headers, over the "
            f"server's max_payload of {max_payload}"
        )


@functools.lru_cache(maxsize=4096)
def _header_name_ok(name: str) -> bool:
    return _HEADER_NAME_RE.fullmatch(name) is not None


def _hpub(subject: str, reply: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """The HPUB protocol command nats-py would write for this message, built faster.

    nats-py 2.16 runs ``str.translate`` over every header value to fold CR/LF,
    which costs ~3 us per header, more than the rest of a publish. Header
    values rarely hold CR/LF, so only those that do are translated; names are
    checked once each (they repeat). The result is byte-for-byte what
    ``Client.publish`` sends: values stripped, CR/LF replaced by spaces.
    """
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if not _header_name_ok(name):
            raise TransportError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES_TO_SPACES)
        lines.append(f"{name}: {value.strip()}\r\n")
    lines.append("\r\n")
    block = "".join(lines).encode()
    head = f"HPUB {subject} {reply} {len(block)} {len(block) + len(payload)}\r\n".encode()
    return head + block + payload + b"\r\n"


def _status_of(msg: Msg) -> str | None:
    return msg.headers.get(_STATUS_HEADER) if msg.headers else None


def _ack_failure(msg: Msg) -> str | None:
    """Why a JetStream publish ack reports a failure, or None for success."""
    status = _status_of(msg)
    if status == "503":
        # No responders: no stream has the subject, or the server (just
        # restarted) has not loaded its streams yet.
        return "no stream answered on its subject (the topic does not exist, or NATS is restarting)"
    if status is not None:
        return f"status {status} {msg.headers.get(_DESCRIPTION_HEADER, '') if msg.headers else ''}"
    if b'"error"' not in msg.data:
        return None
    try:
        error = orjson.loads(msg.data)["error"]
        return f"{error.get('description', error)} (code {error.get('err_code')})"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return msg.data.decode(errors="replace")


def _can_write_commands(nc: Client) -> bool:
    """Whether this nats-py has the internals :func:`_write_command` uses (2.16 does)."""
    return all(hasattr(nc, a) for a in ("_send_command", "_flush_pending", "_flush_queue"))


async def _write_command(nc: Client, command: bytes) -> None:
    """Queue a protocol command as ``Client._send_publish`` does, and kick the flusher."""
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(command)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


class _PublishBatch:
    """The acks outstanding for one ``publish_batch`` call."""

    def __init__(self, messages: Sequence[OutMessage]) -> None:
        self.messages = messages
        self.sent = 0
        self.acked = 0
        self.in_flight_bytes = 0
        self.error: str | None = None
        self._wake_at = -1
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    def on_sent(self, size: int) -> None:
        self.sent += 1
        self.in_flight_bytes += size

    def on_ack(self, index: int, failure: str | None) -> None:
        self.acked += 1
        self.in_flight_bytes -= len(self.messages[index].value)
        if failure is not None and self.error is None:
            topic = self.messages[index].topic
            self.error = f"publish to topic {topic!r} failed: {failure}"
        if self.in_flight <= self._wake_at or self.error is not None:
            self._wake.set()

    async def wait_until(self, in_flight: int, timeout: float) -> None:
        """Wait until at most ``in_flight`` acks are outstanding; fail if acks stop coming."""
        while self.in_flight > in_flight and self.error is None:
            self._wake_at = in_flight
            self._wake.clear()
            acked_before = self.acked
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self.acked == acked_before:
                    topics = sorted({m.topic for m in self.messages})
                    self.error = (
                        f"no publish ack from NATS for {timeout}s "
                        f"({self.in_flight} outstanding, topics {topics})"
                    )
        self._wake_at = -1
