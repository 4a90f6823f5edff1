"""The gate's keyed state: spend so far and the recent allowed calls, per session.

The runtime keys state per (tenant, session) (DESIGN.md, "The event
envelope"), so the gate only ever sees one session of a tenant at a time.
Hence "per-tenant budget" means here: a budget, set per tenant in the
bundle, that each session of that tenant gets on its own. A budget shared by
all of a tenant's sessions needs state keyed by tenant, which this runtime
does not have: it would take a step partitioned by tenant (the gate's
actions re-keyed by tenant, at the price of one hot partition per large
tenant) or a counter outside the stream (Postgres), with its own
consistency story on replay. Neither is done here. The token budget
(``token_budget``, limits.rego) has the same shape for the same reason: its
total is the planner's keyed state, per (tenant, session), which arrives on
each action as ``usage.session_total_tokens``; the gate keeps no tokens.

The rate window uses event times, not the wall clock, so a replay of the
same events gives the same decisions. Only allowed and redacted actions are
charged; a denied action costs nothing and does not count towards the rate.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Final

from sluicegate.streams.errors import SluiceError

STATE_KEY: Final = "policy"
# The most call times kept: bounds the state whatever the rate limit says
# (a limit above this would see at most this many calls in its window).
MAX_CALLS: Final = 10_000


class LedgerError(SluiceError, ValueError):
    """The stored state is not what the gate writes (a bug, or a tampered store)."""


@dataclass(slots=True)
class Ledger:
    """Spend so far, and the event times (ms) of recent allowed calls, oldest first."""

    spend: int | float
    calls: list[int]

    def calls_in_window(self, now_ms: int, window_ms: int) -> int:
        """Allowed calls after ``now_ms - window_ms``.

        Calls stamped after ``now_ms`` (events out of time order) count too:
        when in doubt, the limit errs on the strict side.
        """
        start = now_ms - window_ms
        try:
            return sum(1 for t in self.calls if t > start)
        except TypeError:
            raise LedgerError(f"state[{STATE_KEY!r}].calls holds a non-number") from None

    def charge(self, cost: int | float, now_ms: int, window_ms: int) -> None:
        """Record an allowed call: add its cost, remember its time, forget old calls."""
        self.spend += cost
        start = now_ms - window_ms
        self.calls = [t for t in self.calls if t > start]
        self.calls.append(now_ms)
        del self.calls[: max(0, len(self.calls) - MAX_CALLS)]


def load(state: MutableMapping[str, Any]) -> Ledger:
    """The session's ledger (empty for a new session); LedgerError if the state is bad."""
    raw = state.get(STATE_KEY)
    if raw is None:
        return Ledger(spend=0, calls=[])
    if not isinstance(raw, dict):
        raise LedgerError(f"state[{STATE_KEY!r}] is not an object")
    spend, calls = raw.get("spend", 0), raw.get("calls", [])
    if isinstance(spend, bool) or not isinstance(spend, int | float) or spend < 0:
        raise LedgerError(f"state[{STATE_KEY!r}].spend is not a non-negative number")
    if not isinstance(calls, list):
        raise LedgerError(f"state[{STATE_KEY!r}].calls is not a list of times")
    # The elements are checked where they are used (calls_in_window), which
    # walks the list anyway: a second walk here cost as much as the rest.
    return Ledger(spend=spend, calls=calls)


def store(state: MutableMapping[str, Any], ledger: Ledger) -> None:
    state[STATE_KEY] = {"spend": ledger.spend, "calls": ledger.calls}
