"""Who is in a Kafka consumer group, and which partitions each member holds.

For ``sluice status`` and ``sluice offsets reset``: each step's workers form
the consumer group ``<prefix>.<step>`` (streams/transports/kafka/names.py),
so a group's members are that step's live workers.

DescribeGroups is sent at version 0 or 1 by a request declared here:
aiokafka 0.14 decodes a version 3 answer (the one it picks on current
brokers) with the version 2 layout, which breaks as soon as an answer holds
two groups. Members' assignments are decoded from the consumer protocol's
bytes. Some brokers (Tansu, the local stack's) list members but fill in
neither their client ids, hosts nor assignments: then ``assignment`` is
None and callers know only that the group is live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import (
    DescribeGroupsRequest_v0,
    DescribeGroupsRequest_v1,
    ListGroupsRequest,
)
from aiokafka.protocol.api import Request

from sluicegate.streams.transport import TransportError

_GROUP_COORDINATOR = 0  # FindCoordinator's key type for consumer groups
# Group states with no member holding anything.
_IDLE_STATES = frozenset({"Empty", "Dead", ""})


@dataclass(frozen=True, slots=True)
class GroupMember:
    member_id: str
    client_id: str
    host: str
    # (Kafka topic name, partition) held; None when the broker did not say.
    assignment: frozenset[tuple[str, int]] | None

    @property
    def name(self) -> str:
        """How to name the member to an operator: client id and host when known."""
        who = self.client_id or self.member_id
        host = self.host.lstrip("/")
        return f"{who}@{host}" if host else who


@dataclass(frozen=True, slots=True)
class GroupView:
    group: str
    state: str
    members: tuple[GroupMember, ...] = ()

    @property
    def live(self) -> bool:
        return bool(self.members) and self.state not in _IDLE_STATES

    def holder(self, topic: str, partition: int) -> GroupMember | None:
        """The member assigned (``topic``, ``partition``), when the broker says."""
        for member in self.members:
            if member.assignment is not None and (topic, partition) in member.assignment:
                return member
        return None

    @property
    def assignments_known(self) -> bool:
        return any(m.assignment is not None for m in self.members)


class _DescribeGroups(Request[DescribeGroupsRequest_v0 | DescribeGroupsRequest_v1]):  # type: ignore[misc]
    """DescribeGroups at version 0 or 1 (see the module docstring for why not higher)."""

    API_KEY = 15

    def __init__(self, groups: Sequence[str]) -> None:
        self._groups = list(groups)

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class(self._groups)


async def describe_groups(
    bootstrap: str,
    groups: Sequence[str],
    *,
    listed_prefix: str | None = None,
    timeout: float = 10.0,
    security: Mapping[str, Any] | None = None,
) -> dict[str, GroupView]:
    """Describe ``groups`` (unknown ones come back idle); raises ``TransportError``.

    ``security``: aiokafka's protocol, SASL and TLS options
    (``service_security.kafka_security_options``).

    With ``listed_prefix``, also every group the brokers list whose id starts
    with it (best effort: a broker that lists nothing, as Tansu does, adds none).
    """
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **(security or {})
    )
    try:
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            wanted = list(groups)
            if listed_prefix is not None:
                listed = await asyncio.wait_for(_list(client), timeout)
                wanted += [g for g in listed if g.startswith(listed_prefix)]
            return await asyncio.wait_for(_describe(client, wanted), timeout)
        except TimeoutError:
            raise TransportError(
                f"Kafka at {bootstrap} did not describe consumer groups within {timeout:g}s"
            ) from None
        except KafkaError as exc:
            raise TransportError(
                f"describing consumer groups on Kafka at {bootstrap} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    finally:
        with contextlib.suppress(Exception):  # closing a client that never connected
            await client.close()


async def _list(client: Any) -> list[str]:
    """Every group the brokers list; a broker that refuses adds none (best effort)."""
    names: list[str] = []
    for broker in client.cluster.brokers():
        try:
            response = await client.send(broker.nodeId, ListGroupsRequest())
        except KafkaError:
            continue
        if not response.error_code:
            names += [str(group) for group, *_rest in response.groups]
    return sorted(set(names))


async def _describe(client: Any, groups: Sequence[str]) -> dict[str, GroupView]:
    by_node: dict[int, list[str]] = {}
    for group in dict.fromkeys(groups):
        node = await client.coordinator_lookup(_GROUP_COORDINATOR, group)
        by_node.setdefault(node, []).append(group)
    views: dict[str, GroupView] = {}
    for node, names in by_node.items():
        response = await client.send(node, _DescribeGroups(names))
        for error_code, group, state, protocol_type, _protocol, members in response.groups:
            if error_code:
                raise for_code(error_code)(f"describing group {group}")
            views[group] = GroupView(
                group=group,
                state=state or "",
                members=tuple(_member(m, protocol_type) for m in members),
            )
    return views


def _member(raw: tuple[Any, ...], protocol_type: str) -> GroupMember:
    member_id, client_id, host, _metadata, assignment = raw
    return GroupMember(
        member_id=member_id or "",
        client_id=client_id or "",
        host=host or "",
        assignment=decode_assignment(assignment) if protocol_type == "consumer" else None,
    )


def decode_assignment(raw: bytes | None) -> frozenset[tuple[str, int]] | None:
    """A consumer-protocol assignment as (topic, partition) pairs; None if absent or unreadable."""
    if not raw:
        return None
    try:
        decoded = ConsumerProtocolMemberAssignment.decode(raw)
    except (ValueError, TypeError, IndexError, EOFError):
        return None
    return frozenset(
        (topic, int(p)) for topic, partitions in decoded.assignment for p in partitions
    )
