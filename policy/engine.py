"""The Rego engine behind the gate: a small protocol and its regorus implementations.

``compile_bundle`` turns a :class:`~policy.bundle.Bundle` into a
:class:`PolicyEngine` that evaluates one query (the decision rule) on a JSON
input. Two regorus back ends, chosen by measurement (benchmarks/policy_gate.py):

- ``rvm``: regorus' compiled mode (``Program.compile_from_modules`` + ``Rvm``),
  about 4x faster than the interpreter on the reference policies. It does not
  compile every construct yet (``walk``, ``with``, calling an imported
  function through its alias), turns runtime errors (bad types, conflicting
  values) into an undefined result, and stops any evaluation after 25,000
  instructions with an error, which bounds a pathological policy's time;
- ``interpreter``: ``regorus.Engine``, which supports the whole language and
  raises on runtime errors, but has no instruction limit.

``auto`` (the default) uses the RVM and falls back to the interpreter for a
bundle the RVM cannot compile. Both fail closed in the gate: an error or an
undefined result is a deny.

Batch evaluation: regorus evaluates one input per call. A batch query over a
list of inputs (``[d | some x in input; d := decision with input as x]``)
needs ``with``, which only the interpreter has, and measured 2.5x slower per
input there than one call each; so ``evaluate_many`` is a loop, kept in the
protocol for engines that can do better.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final, Literal, Protocol

import orjson
import regorus
from regorus import regorus as native

from sluicegate.policy.bundle import Bundle
from sluicegate.streams.errors import SluiceError

log = logging.getLogger("sluicegate.policy")

DECISION_RULE: Final = "data.sluice.gate.decision"
# What regorus prints for an undefined result (both back ends).
_UNDEFINED_JSON: Final = '"<undefined>"'

Mode = Literal["auto", "rvm", "interpreter"]


class _Undefined:
    """The type of :data:`UNDEFINED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"


# The query has no value for this input (Rego's "undefined"), as opposed to null.
UNDEFINED: Final = _Undefined()


class PolicyCompileError(SluiceError):
    """The bundle does not compile (syntax, unknown function, missing decision rule)."""


class PolicyEvalError(SluiceError):
    """Evaluating the decision failed (a runtime error, the RVM instruction limit)."""


class PolicyEngine(Protocol):
    """One compiled bundle, ready to evaluate its decision query."""

    version: str
    mode: str

    def evaluate(self, input_json: str) -> Any:
        """The query's value for ``input_json`` (parsed JSON), or :data:`UNDEFINED`.

        Raises :class:`PolicyEvalError` when evaluation fails.
        """
        ...

    def evaluate_many(self, inputs: Sequence[str]) -> list[Any]:
        """``evaluate`` for each input, in order (an error fails the whole call)."""
        ...


class Compiler(Protocol):
    """Makes an engine from a bundle (``compile_bundle``, or a test's fake)."""

    def __call__(self, bundle: Bundle) -> PolicyEngine: ...


def regorus_message(exc: BaseException) -> str:
    """A regorus error without the Rust backtrace it carries."""
    text = str(exc).split("Stack backtrace:", 1)[0]
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:2000]


def _parse(result: str) -> Any:
    if result == _UNDEFINED_JSON:
        return UNDEFINED
    return orjson.loads(result)


class RvmEngine:
    """The bundle compiled to an RVM program; one VM, reused for every input."""

    mode = "rvm"

    def __init__(self, bundle: Bundle, entrypoint: str = DECISION_RULE) -> None:
        self.version = bundle.version
        self.entrypoint = entrypoint
        try:
            program = native.Program.compile_from_modules(
                bundle.data_json, list(bundle.modules), [entrypoint]
            )
            self._vm = native.Rvm()
            self._vm.load_program(program)
            self._vm.set_data_json(bundle.data_json)
        except Exception as exc:  # regorus raises RuntimeError for everything
            raise PolicyCompileError(regorus_message(exc)) from None

    def evaluate(self, input_json: str) -> Any:
        try:
            self._vm.set_input_json(input_json)
            # The program has one entry point, so execute() runs it.
            result: str = self._vm.execute()
        except Exception as exc:
            raise PolicyEvalError(regorus_message(exc)) from None
        return _parse(result)

    def evaluate_many(self, inputs: Sequence[str]) -> list[Any]:
        return [self.evaluate(item) for item in inputs]


class InterpreterEngine:
    """The bundle loaded into a ``regorus.Engine`` (the tree-walking interpreter)."""

    mode = "interpreter"

    def __init__(self, bundle: Bundle, entrypoint: str = DECISION_RULE) -> None:
        self.version = bundle.version
        self.entrypoint = entrypoint
        self._engine = regorus.Engine()
        try:
            for name, text in bundle.modules:
                self._engine.add_policy(name, text)
            self._engine.add_data_json(bundle.data_json)
        except Exception as exc:
            raise PolicyCompileError(regorus_message(exc)) from None
        # The interpreter resolves rule paths lazily; probe once so a bundle
        # without the decision rule is refused at load, as the RVM does.
        try:
            self._engine.set_input_json("{}")
            self._engine.eval_rule_as_json(entrypoint)
        except Exception as exc:
            message = regorus_message(exc)
            if "not a valid rule path" in message:
                raise PolicyCompileError(f"{entrypoint}: {message}") from None

    def evaluate(self, input_json: str) -> Any:
        try:
            self._engine.set_input_json(input_json)
            result: str = self._engine.eval_rule_as_json(self.entrypoint)
        except Exception as exc:
            raise PolicyEvalError(regorus_message(exc)) from None
        return _parse(result)

    def evaluate_many(self, inputs: Sequence[str]) -> list[Any]:
        return [self.evaluate(item) for item in inputs]


def compile_bundle(
    bundle: Bundle, *, mode: Mode = "auto", entrypoint: str = DECISION_RULE
) -> PolicyEngine:
    """The fastest engine that compiles ``bundle``; raises :class:`PolicyCompileError`."""
    if mode == "rvm":
        return RvmEngine(bundle, entrypoint)
    if mode == "interpreter":
        return InterpreterEngine(bundle, entrypoint)
    try:
        return RvmEngine(bundle, entrypoint)
    except PolicyCompileError as rvm_error:
        # If neither compiles, the interpreter's error is the one to show: it
        # knows the whole language, where the RVM may only say "not supported".
        engine = InterpreterEngine(bundle, entrypoint)
        log.info(
            "policy %s: the RVM cannot compile it (%s); using the interpreter",
            bundle.version,
            rvm_error,
        )
        return engine
