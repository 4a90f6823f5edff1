"""Sample upstream tasks: the demo's fixed set, and a generator for ``publish --generate``.

The samples exercise every built-in tool and every reference policy rule:
allowed tools, a dangerous tool, a tool outside the tenant's allowlist, an
http_post to a host outside the allowlist, PII that is redacted (e-mail,
phone, a Luhn-valid card), oversized arguments, and fan-out plans.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    tenant: str
    session: str
    prompt: str
    # What the reference policies and tools should make of it (for the demo summary).
    expect: str
    agent: str = "assistant"

    def as_json(self) -> dict[str, Any]:
        return {
            "type": "task.submitted",
            "tenant": self.tenant,
            "session": self.session,
            "data": {"prompt": self.prompt, "agent": self.agent},
        }


DEMO: tuple[Sample, ...] = (
    Sample("acme", "alice", "what is 6 * 7", "completed"),
    Sample("acme", "alice", "search for hash chained audit log", "completed"),
    Sample("acme", "alice", "what time is it", "completed"),
    Sample("acme", "bob", "what is 2 ** 10; search for dead letter queue", "completed"),
    Sample("acme", "bob", "echo hello from the sluicegate demo", "completed"),
    Sample("acme", "bob", "email alice@example.com the summary", "completed (e-mail redacted)"),
    Sample("acme", "carol", "echo call me on +44 20 7946 0958", "completed (phone redacted)"),
    Sample("acme", "carol", "echo card 4111 1111 1111 1111 on file", "completed (card redacted)"),
    Sample("acme", "carol", "run shell: rm -rf /", "denied (dangerous tool)"),
    Sample("acme", "dave", "write sql: DROP TABLE customers", "denied (dangerous tool)"),
    Sample("acme", "dave", "post the report to https://evil.example.com/x", "denied (host)"),
    Sample("acme", "dave", "echo " + "x" * 5000, "denied (arguments too large)"),
    Sample("globex", "erin", "calculate (17 + 4) * 3", "completed"),
    Sample("globex", "erin", "run shell: ls /tmp", "denied (dangerous tool)"),
    Sample("acme", "frank", "search for murmur2 partitioning and then what is 99 / 3", "completed"),
    Sample("acme", "frank", "echo ok; run shell: reboot", "partial (one action denied)"),
    Sample("acme", "grace", "refund 40 for order A-1001", "completed (under the threshold)"),
)

# Held by the reference policy until someone approves it: the demo publishes
# it after DEMO and approves it itself (other users of DEMO need no operator).
DEMO_HELD: tuple[Sample, ...] = (
    Sample("acme", "grace", "refund 250 for order A-1002", "completed (held, approved by demo)"),
)

# One line that is not a task at all: the demo publishes it raw, and the
# intake step dead-letters it.
MALFORMED = b'{"type": "task.submitted", "tenant": "acme", "data": {"prompt": '


_GENERATED = (
    "what is {a} * {b}",
    "calculate ({a} + {b}) / 2",
    "search for {topic}",
    "what time is it",
    "echo ticket {a}-{b} received",
    "email {name}@example.com the summary of ticket {a}",
    "echo card on file 4111 1111 1111 1111",
    "run shell: cat /etc/passwd",
    "write sql: DELETE FROM orders WHERE id = {a}",
    "post the digest to https://api.acme.example/v1/digest",
    "post the digest to https://exfil.example.net/drop",
    "search for {topic} and then what is {a} + {b}",
)
_TOPICS = ("dead letter queue", "consumer groups", "keyed state", "rego policies", "tracing")
_NAMES = ("alice", "bob", "carol", "dave")


def generate(
    n: int, *, sessions: int = 50, seed: int = 7, run: str = ""
) -> Iterator[dict[str, Any]]:
    """``n`` synthetic task objects (JSON-ready), deterministic for a seed.

    Sessions are ``gen-<run>-<k>``: ``sluice publish --generate`` passes a
    fresh ``run`` each time, since sessions reused across runs soon hit
    their budget and rate limits and every later task is denied.
    """
    base = f"gen-{run}-" if run else "gen-"
    rng = random.Random(seed)
    for i in range(n):
        template = _GENERATED[i % len(_GENERATED)]
        prompt = template.format(
            a=rng.randint(1, 999),
            b=rng.randint(1, 99),
            topic=rng.choice(_TOPICS),
            name=rng.choice(_NAMES),
        )
        tenant = "globex" if i % 10 == 9 else "acme"
        yield {
            "type": "task.submitted",
            "tenant": tenant,
            "session": f"{base}{i % sessions}",
            "data": {"prompt": prompt},
        }
