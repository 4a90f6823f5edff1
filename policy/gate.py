"""The policy gate: the step between ``actions.proposed`` and ``actions.allowed``/``denied``.

For each ``action.proposed`` it reads the session's ledger (spend, recent
calls), asks the live bundle for a decision, charges the ledger when the
action goes through, emits ``action.allowed`` (arguments possibly redacted)
or ``action.denied``, and records one ``decision`` audit row. It never
raises for a policy problem: see :mod:`policy.evaluator` for how every
failure becomes a ``policy_error`` deny.

Token budgets: the planner puts the model tokens behind a plan on each
``action.proposed`` (``usage``: the call's ``total_tokens`` and the
session's ``session_total_tokens``, from the planner's keyed state); the
gate passes them into the policy input as they are and keeps no token state
of its own, and the reference bundle denies with ``token_budget_exceeded``
past the tenant's ``token_budget``. Like the spend budget, that budget is
set per tenant and applied per session (state is keyed per (tenant,
session), see :mod:`policy.ledger`). Upgrade gates before planners: an older
gate's schema refuses ``usage`` and dead-letters the action.

A ``hold`` goes to ``actions.held`` and waits, durably, for a person or its
deadline (``SLUICE_APPROVAL_TIMEOUT`` seconds): see :mod:`policy.holds`,
which the gate's ``tick`` runs to resume decided actions.

A shadow bundle (``SLUICE_POLICY_SHADOW`` or ``shadow=``) is evaluated on the
same input and never enforced; each divergence from the live decision is a
``shadow_divergence`` audit row carrying both. The shadow sees the live
ledger (what the session really spent), not a ledger of its own.

Hot reload: ``maybe_reload()`` (called from ``process()``, at most every
``reload_interval_s``) stats the bundle files and, when they changed,
reloads, compiles and swaps the bundle in; ``install_sighup(loop)`` makes
SIGHUP reload at once. A bundle that fails to load or compile is refused with
an error log and the old one keeps deciding. Deploy bundles atomically
(write a new directory, then swap a symlink): a reader polling a half-written
file could load a policy nobody wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from sluicegate.policy import holds, ledger
from sluicegate.policy.bundle import Signature, default_bundle_path, load_bundle, signature
from sluicegate.policy.decision import HOLD, Decision, policy_error
from sluicegate.policy.engine import Compiler, compile_bundle
from sluicegate.policy.evaluator import (
    DEFAULT_BUDGET_S,
    DEFAULT_CACHE_SIZE,
    LoadedPolicy,
    Request,
    Verdict,
)
from sluicegate.policy.schemas import (
    ACTION_ALLOWED,
    ACTION_DENIED,
    ACTION_HELD,
    ACTION_PROPOSED,
    ACTIONS_ALLOWED,
    ACTIONS_DENIED,
    ACTIONS_HELD,
    ACTIONS_PROPOSED,
    ProposedAction,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Hooks, Output, TickContext

log = logging.getLogger("sluicegate.policy")

ENV_BUNDLE: Final = "SLUICE_POLICY_BUNDLE"
ENV_SHADOW: Final = "SLUICE_POLICY_SHADOW"
ENV_APPROVAL_TIMEOUT: Final = "SLUICE_APPROVAL_TIMEOUT"
# How long a held action waits for a person before it is denied (seconds).
DEFAULT_APPROVAL_TIMEOUT_S: Final = 3600.0
DEFAULT_RELOAD_INTERVAL_S: Final = 2.0
DEFAULT_RATE_WINDOW_S: Final = 60.0
ERROR_LOG_INTERVAL_S: Final = 10.0


@dataclass(slots=True)
class GateStats:
    decisions: int = 0
    allowed: int = 0
    denied: int = 0
    redacted: int = 0
    held: int = 0
    policy_errors: int = 0
    shadow_divergences: int = 0
    reloads: int = 0
    refused_reloads: int = 0


class _Watched:
    """A bundle path, the policy loaded from it, and what the last poll saw."""

    __slots__ = ("label", "path", "policy", "refused", "seen")

    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self.path = path
        self.policy: LoadedPolicy | None = None
        self.seen: Signature = ()
        # The version of the last refused bundle, so a broken bundle is
        # reported once, not on every poll.
        self.refused: str | None = None


class PolicyGate(Hooks):
    """The policy gate step (name ``gate``).

    ``bundle`` defaults to ``SLUICE_POLICY_BUNDLE``, else the packaged
    reference policies; ``shadow`` to ``SLUICE_POLICY_SHADOW``, else none
    (``environ`` replaces ``os.environ`` for both).
    """

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        shadow: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        compiler: Compiler = compile_bundle,
        eval_budget_s: float = DEFAULT_BUDGET_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
        reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
        rate_window_s: float = DEFAULT_RATE_WINDOW_S,
        approval_timeout_s: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        # Instance attributes (not class variables) so the gate is a
        # ``streams.step.Processor`` for mypy as well as at runtime.
        self.name: str = "gate"
        self.inputs: Sequence[str] = (ACTIONS_PROPOSED,)
        self.outputs: Sequence[str] = (ACTIONS_ALLOWED, ACTIONS_DENIED, ACTIONS_HELD)
        self.accepts: Mapping[str, type[BaseModel]] = {ACTION_PROPOSED: ProposedAction}
        # Ticks resume held actions once decided (policy.holds).
        self.ticks: bool = True
        self.stats = GateStats()
        self._compiler = compiler
        self._budget_s = eval_budget_s
        self._cache_size = cache_size
        self._reload_interval_s = reload_interval_s
        self._window_ms = int(rate_window_s * 1000)
        self._monotonic = monotonic
        self._last_poll = monotonic()
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._last_approvals_error = -ERROR_LOG_INTERVAL_S
        self._errors_unlogged = 0
        env = os.environ if environ is None else environ
        if approval_timeout_s is None:
            approval_timeout_s = approval_timeout_from(env)
        self._approval_timeout = timedelta(seconds=approval_timeout_s)
        self._clock = clock or (lambda: datetime.now(UTC))
        bundle = bundle or env.get(ENV_BUNDLE) or default_bundle_path()
        shadow = shadow or env.get(ENV_SHADOW) or None
        self._live = _Watched("live", Path(bundle))
        # The live bundle must load: a gate without a policy would deny everything.
        self._live.policy = self._load(self._live.path)
        self._live.seen = signature(self._live.path)
        self._shadow: _Watched | None = None
        if shadow:
            self._shadow = _Watched("shadow", Path(shadow))
            self._shadow.seen = signature(self._shadow.path)
            self._swap(self._shadow)

    @property
    def policy(self) -> LoadedPolicy:
        """The live policy."""
        policy = self._live.policy
        if policy is None:  # set in __init__ and only ever replaced, so never
            raise RuntimeError("policy gate has no live policy")
        return policy

    @property
    def bundle_paths(self) -> tuple[Path, ...]:
        """The live bundle's directory, then the shadow bundle's if there is one."""
        return (self._live.path,) + ((self._shadow.path,) if self._shadow else ())

    @property
    def shadow_policy(self) -> LoadedPolicy | None:
        return self._shadow.policy if self._shadow else None

    # -- deciding ----------------------------------------------------------------------

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        self.maybe_reload()
        action = (
            ctx.data
            if isinstance(ctx.data, ProposedAction)
            else ProposedAction.model_validate(event.data)
        )
        now_ms = _epoch_ms(event.time)
        policy = self.policy
        try:
            book = ledger.load(ctx.state)
            calls = book.calls_in_window(now_ms, self._window_ms)
        except ledger.LedgerError as exc:
            # Fail closed: a session whose ledger cannot be read gets nothing
            # through (resetting it would hand out a fresh budget).
            failed = Verdict(policy_error(policy.version, f"bad gate state: {exc}"), {})
            return self._emit(ctx, event, action.tool, failed, None)
        request = Request(
            tenant=event.tenant,
            agent=action.agent,
            tool=action.tool,
            args=action.args,
            spend=book.spend,
            calls_in_window=calls,
            usage=action.usage,
        )
        verdict = policy.decide(request)
        shadow = self.shadow_policy
        if shadow is not None:
            self._compare(ctx, verdict.decision, shadow.decide(request).decision)
        if verdict.decision.allowed:
            book.charge(verdict.decision.cost, now_ms, self._window_ms)
            ledger.store(ctx.state, book)
        return self._emit(ctx, event, action.tool, verdict, book)

    async def tick(self, now: datetime, tc: TickContext) -> list[Output]:
        """Resume the held actions of idle sessions that were decided or timed out."""
        try:
            return await holds.resume(tc, now, self._window_ms)
        except holds.ApprovalsUnavailable as exc:
            # One line now and then, not a traceback a second, while Postgres is away.
            now_s = self._monotonic()
            if now_s - self._last_approvals_error >= ERROR_LOG_INTERVAL_S:
                self._last_approvals_error = now_s
                log.warning("gate: cannot read approvals, held actions wait: %s", exc)
            return []

    def _emit(
        self,
        ctx: Context,
        event: Event,
        tool: str,
        verdict: Verdict,
        book: ledger.Ledger | None,
    ) -> list[Output]:
        """Audit the decision and route the action to its topic."""
        decision = verdict.decision
        self._count(decision)
        ctx.record(
            "decision",
            decision=decision.decision,
            reasons=decision.reasons,
            policy_version=decision.policy_version,
            detail={
                **_audit_detail(tool, verdict, book),
                # What was decided on, as forwarded: PII the policy redacts is
                # masked (the decision log export, `sluice audit export`, reads it).
                "agent": event.data.get("agent"),
                "args": verdict.args,
                # The tokens a token budget was judged on, when the planner sent them.
                **({"usage": event.data["usage"]} if event.data.get("usage") else {}),
            },
        )
        # The proposal as it came (validated), with the decision's fields.
        data = {
            **event.data,
            "args": verdict.args,
            "decision": decision.decision,
            "reasons": list(decision.reasons),
            "policy_version": decision.policy_version,
        }
        if decision.allowed:
            return [ctx.output(ACTIONS_ALLOWED, ACTION_ALLOWED, data)]
        if decision.decision == HOLD:
            return [self._hold(ctx, event, verdict, data)]
        return [ctx.output(ACTIONS_DENIED, ACTION_DENIED, data)]

    def _hold(self, ctx: Context, event: Event, verdict: Verdict, data: dict[str, Any]) -> Output:
        """Send the action to ``actions.held`` and ask a person (see policy.holds)."""
        deadline = self._clock() + self._approval_timeout
        held = ctx.output(ACTIONS_HELD, ACTION_HELD, {**data, "deadline": deadline.isoformat()})
        decision = verdict.decision
        ctx.request_approval(
            held.event.id,
            task_id=str(data["task_id"]),
            tool=str(data["tool"]),
            args=verdict.args,
            reasons=decision.reasons,
            deadline=deadline,
            policy_version=decision.policy_version,
        )
        holds.remember(
            ctx.state, held.event.id, data=data, decision=decision, event=event, deadline=deadline
        )
        return held

    def _compare(self, ctx: Context, live: Decision, candidate: Decision) -> None:
        if live.outcome() == candidate.outcome():
            return
        self.stats.shadow_divergences += 1
        ctx.record(
            "shadow_divergence",
            decision=candidate.decision,
            reasons=candidate.reasons,
            policy_version=candidate.policy_version,
            detail={"live": live.summary(), "shadow": candidate.summary()},
        )

    def _count(self, decision: Decision) -> None:
        stats = self.stats
        stats.decisions += 1
        if decision.decision == "allow":
            stats.allowed += 1
        elif decision.decision == "redact":
            stats.redacted += 1
        elif decision.decision == HOLD:
            stats.held += 1
        else:
            stats.denied += 1
            if decision.error is not None:
                stats.policy_errors += 1
                self._log_policy_error(decision)

    def _log_policy_error(self, decision: Decision) -> None:
        # A broken policy fails every action: log the first error, then at
        # most one line per interval with the count, not one per event.
        now = self._monotonic()
        self._errors_unlogged += 1
        if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            return
        log.warning(
            "policy %s: %d action(s) denied with policy_error; latest: %s",
            decision.policy_version,
            self._errors_unlogged,
            decision.error,
        )
        self._errors_unlogged = 0
        self._last_error_log = now

    # -- reloading ---------------------------------------------------------------------

    def maybe_reload(self) -> bool:
        """Reload changed bundles if ``reload_interval_s`` passed since the last look."""
        now = self._monotonic()
        if now - self._last_poll < self._reload_interval_s:
            return False
        self._last_poll = now
        return self.reload()

    def reload(self) -> bool:
        """Reload every bundle whose files changed; True if one was swapped in."""
        swapped = False
        for watched in (self._live, self._shadow):
            if watched is None:
                continue
            seen = signature(watched.path)
            if seen == watched.seen:
                continue
            watched.seen = seen
            swapped = self._swap(watched) or swapped
        return swapped

    async def open(self) -> None:
        """A worker starting the gate: SIGHUP reloads its bundles from now on (Unix)."""
        # Not where signals cannot be handled (another thread's loop, Windows).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            self.install_sighup(asyncio.get_running_loop())

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on SIGHUP (Unix), between two events: the loop runs the handler."""
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        log.info("policy: SIGHUP, reloading")
        for watched in (self._live, self._shadow):
            if watched is not None:
                watched.seen = signature(watched.path)
                self._swap(watched)

    def _swap(self, watched: _Watched) -> bool:
        """Load ``watched``'s bundle and make it current, unless unchanged or broken."""
        current = watched.policy.version if watched.policy else None
        # Anything a bundle or a compiler can throw is a refusal: a reload
        # runs inside process(), which must not crash on a bad deployment.
        try:
            bundle = load_bundle(watched.path)
        except Exception as exc:
            return self._refuse(watched, None, exc)
        if bundle.version in (current, watched.refused):
            return False  # touched but not changed, or already refused
        try:
            policy = LoadedPolicy.from_bundle(
                bundle,
                compiler=self._compiler,
                budget_s=self._budget_s,
                cache_size=self._cache_size,
            )
        except Exception as exc:
            return self._refuse(watched, bundle.version, exc)
        watched.policy = policy
        watched.refused = None
        self.stats.reloads += 1
        log.info(
            "policy: %s bundle %s is now %s (was %s; engine %s)",
            watched.label,
            watched.path,
            policy.version,
            current or "none",
            policy.engine.mode,
        )
        return True

    def _refuse(self, watched: _Watched, version: str | None, error: Exception) -> bool:
        watched.refused = version
        self.stats.refused_reloads += 1
        current = watched.policy.version if watched.policy else "nothing"
        log.error(
            "policy: refused %s bundle %s (%s): %s; still enforcing %s",
            watched.label,
            watched.path,
            version or "unreadable",
            error,
            current,
        )
        return False

    def _load(self, path: Path) -> LoadedPolicy:
        return LoadedPolicy.load(
            path, compiler=self._compiler, budget_s=self._budget_s, cache_size=self._cache_size
        )


def approval_timeout_from(env: Mapping[str, str]) -> float:
    """``SLUICE_APPROVAL_TIMEOUT`` (seconds, > 0), else the default; ValueError naming it."""
    raw = env.get(ENV_APPROVAL_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_APPROVAL_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"{ENV_APPROVAL_TIMEOUT} must be a positive number of seconds, got {raw!r}"
        )
    return value


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _audit_detail(tool: str, verdict: Verdict, book: ledger.Ledger | None) -> dict[str, Any]:
    decision = verdict.decision
    detail: dict[str, Any] = {"tool": tool, "cached": verdict.cached}
    if not verdict.cached:
        detail["eval_us"] = round(verdict.eval_s * 1e6)
    if decision.charged:
        detail["cost"] = decision.cost
    if book is not None:
        detail["spend"] = book.spend
    if decision.masks:
        # Where and how arguments were masked; never the matched text itself.
        detail["masks"] = [{"path": list(m.path), "mask": m.mask} for m in decision.masks]
    if decision.detail:
        detail["policy"] = dict(decision.detail)
    if decision.error is not None:
        detail["error"] = decision.error
    return detail
