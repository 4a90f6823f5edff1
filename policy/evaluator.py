"""One loaded bundle, deciding: input building, cache, engine, time budget, checks.

:meth:`LoadedPolicy.decide` never raises. Whatever goes wrong (arguments too
complex to scan, an engine error, an undefined or malformed result, masks
that do not fit, an evaluation over its time budget) comes back as a deny
with ``policy_error`` and the cause in ``Decision.error``: the gate fails
closed.

The time budget (CPU time of the evaluation; wall time up to 4x it) is
checked after the fact: regorus cannot be interrupted from Python. What
bounds a runaway evaluation is the RVM's instruction limit (25,000
instructions, an error); the interpreter has none, which is one more reason
the RVM is the default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

from sluicegate.policy.bundle import Bundle, load_bundle
from sluicegate.policy.cache import DecisionCache, cache_key, deterministic
from sluicegate.policy.decision import (
    Decision,
    MalformedDecision,
    apply_masks,
    parse_decision,
    policy_error,
)
from sluicegate.policy.engine import UNDEFINED, Compiler, PolicyEngine, compile_bundle
from sluicegate.policy.features import InputBuilder, InputTooComplex
from sluicegate.policy.schemas import TokenUsage

DEFAULT_BUDGET_S: Final = 0.050
# Wall-clock ceiling, as a multiple of the (CPU time) budget.
WALL_CEILING: Final = 4.0
DEFAULT_CACHE_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class Request:
    """What the gate knows about one proposed action when it asks the policy."""

    tenant: str
    agent: str
    tool: str
    args: Mapping[str, Any]
    spend: int | float
    calls_in_window: int
    # The model tokens behind the plan (``action.proposed`` ``usage``), or None.
    usage: TokenUsage | None = None


class Verdict(NamedTuple):
    """A decision with the arguments to forward (masks applied) and how it was reached.

    A NamedTuple, not a frozen dataclass: one is made per decision, and
    building a tuple costs a fraction of a frozen dataclass's ``__init__``.
    """

    decision: Decision
    args: dict[str, Any]
    cached: bool = False
    eval_s: float = 0.0


class LoadedPolicy:
    """A compiled bundle with its input builder and decision cache."""

    def __init__(
        self,
        bundle: Bundle,
        engine: PolicyEngine,
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.bundle = bundle
        self.engine = engine
        self.inputs = InputBuilder(bundle)
        self.budget_s = budget_s
        self._dump_option = orjson.OPT_SORT_KEYS if "args" in self.inputs.fields else 0
        self.cache: DecisionCache[Decision] = DecisionCache(
            cache_size if deterministic(bundle) else 0
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        compiler: Compiler = compile_bundle,
        budget_s: float = DEFAULT_BUDGET_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> LoadedPolicy:
        """Load, check and compile the bundle at ``path``.

        Raises BundleError or PolicyCompileError; nothing is half-loaded.
        """
        bundle = load_bundle(path)
        return cls.from_bundle(bundle, compiler=compiler, budget_s=budget_s, cache_size=cache_size)

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        *,
        compiler: Compiler = compile_bundle,
        budget_s: float = DEFAULT_BUDGET_S,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> LoadedPolicy:
        # The input builder checks the bundle's data (PII patterns, input
        # fields) before the engine compiles it, so a bad bundle fails fast.
        InputBuilder(bundle)
        return cls(bundle, compiler(bundle), budget_s=budget_s, cache_size=cache_size)

    @property
    def version(self) -> str:
        return self.bundle.version

    def policy_input(self, request: Request) -> dict[str, Any]:
        """The input document the policy sees for ``request`` (may raise InputTooComplex)."""
        return self.inputs.build(
            tenant=request.tenant,
            agent=request.agent,
            tool=request.tool,
            args=request.args,
            spend=request.spend,
            calls_in_window=request.calls_in_window,
            usage=None if request.usage is None else request.usage.model_dump(),
        )

    def decide(self, request: Request) -> Verdict:
        """The decision on ``request``; never raises (failures are policy_error denies)."""
        try:
            document = self.policy_input(request)
            # Equal inputs must give equal bytes, which is what the cache keys
            # on: the builder always inserts keys in the same order, except
            # inside the free-form args, which need sorting.
            input_json = orjson.dumps(document, option=self._dump_option)
        except InputTooComplex as exc:
            return self._failed(f"arguments not scannable: {exc}")
        except (TypeError, ValueError) as exc:  # args that are not JSON (a caller's bug)
            return self._failed(f"arguments are not JSON: {exc}")
        key = cache_key(input_json)
        decision = self.cache.get(key)
        cached = decision is not None
        elapsed = 0.0
        if decision is None:
            decision, elapsed = self._evaluate(input_json)
            if decision.error is not None:
                return Verdict(decision, {}, eval_s=elapsed)
            self.cache.put(key, decision)
        try:
            args = apply_masks(request.args, decision.masks)
        except MalformedDecision as exc:
            return self._failed(f"malformed decision: {exc}", elapsed)
        return Verdict(decision, args, cached=cached, eval_s=elapsed)

    def evaluate_input(self, document: Mapping[str, Any]) -> Decision:
        """Decide on a ready-made input document, uncached (``sluice policy test``)."""
        decision, _ = self._evaluate(orjson.dumps(document, option=orjson.OPT_SORT_KEYS))
        return decision

    def _evaluate(self, input_json: bytes) -> tuple[Decision, float]:
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            raw = self.engine.evaluate(input_json.decode())
        except Exception as exc:  # an engine error of any kind is a deny, never a crash
            elapsed = time.perf_counter() - started
            return policy_error(self.version, f"evaluation failed: {exc}"[:2000]), elapsed
        elapsed = time.perf_counter() - started
        cpu = time.thread_time() - started_cpu
        # The budget is on the CPU time the evaluation used: wall time also
        # counts the moments the OS ran something else, which on a busy
        # machine denied actions for nothing the policy did (twice in a few
        # hundred thousand evaluations of our benchmark, on a shared VM).
        # Wall time keeps a looser ceiling, for an engine that blocks.
        if cpu > self.budget_s or elapsed > self.budget_s * WALL_CEILING:
            return policy_error(
                self.version,
                f"evaluation took {cpu * 1000:.1f} ms of CPU, {elapsed * 1000:.1f} ms of wall "
                f"time, over the {self.budget_s * 1000:.1f} ms budget",
            ), elapsed
        if raw is UNDEFINED:
            return policy_error(self.version, "decision is undefined for this input"), elapsed
        try:
            return parse_decision(raw, self.version), elapsed
        except MalformedDecision as exc:
            return policy_error(self.version, f"malformed decision: {exc}"), elapsed

    def _failed(self, error: str, elapsed: float = 0.0) -> Verdict:
        # Arguments nobody vouched for are not forwarded, not even to the denied topic.
        return Verdict(policy_error(self.version, error), {}, eval_s=elapsed)
