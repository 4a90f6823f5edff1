"""Checking a bundle before it is deployed (``sluice policy check``).

Beyond "it loads and compiles" (what the gate checks on reload), this looks
for what would make the gate deny everything or cache wrongly: input fields
the policy reads but the gate does not pass, non-deterministic builtins, a
decision of the wrong shape for a sample input; and it runs the bundle's
Rego unit tests (``test_*`` rules in ``*_test.rego`` files).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import regorus

from sluicegate.policy.bundle import DATA_FILE, Bundle, BundleError, load_bundle
from sluicegate.policy.engine import DECISION_RULE, PolicyCompileError, regorus_message
from sluicegate.policy.evaluator import LoadedPolicy
from sluicegate.policy.features import InputBuilder

_INPUT_REF: Final = re.compile(r"\binput\.([A-Za-z_][A-Za-z0-9_]*)|\binput\[\s*\"([^\"]+)\"\s*\]")
_PACKAGE: Final = re.compile(r"^package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE: Final = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.MULTILINE)
_COMMENT: Final = re.compile(r"#[^\n]*")


@dataclass(frozen=True, slots=True)
class TestResult:
    name: str
    passed: bool
    message: str = ""


@dataclass(slots=True)
class Report:
    path: Path
    version: str | None = None
    engine: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tests: list[TestResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(t.passed for t in self.tests)


def check(path: str | Path) -> Report:
    """Every check on the bundle at ``path``; never raises for a bad bundle."""
    report = Report(Path(path))
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        report.errors.append(str(exc))
        return report
    report.version = bundle.version
    if not (bundle.path / DATA_FILE).is_file():
        # Policies read their limits and lists from data: without it the
        # reference policy denies everything, with reasons that mislead.
        report.errors.append(f"has no {DATA_FILE} (write {{}} there if the policy needs no data)")
    try:
        policy = LoadedPolicy.from_bundle(bundle)
    except (BundleError, PolicyCompileError) as exc:
        report.errors.append(f"does not compile: {exc}")
        return report
    report.engine = policy.engine.mode
    _check_inputs(bundle, policy.inputs, report)
    if not policy.cache.size:
        report.warnings.append(
            "calls a non-deterministic builtin: the gate will not cache its decisions"
        )
    _check_sample(policy, report)
    report.tests = run_tests(bundle)
    return report


def require_sound(path: str | Path) -> Report:
    """``check``, raising :class:`BundleError` (one line) when the bundle fails it.

    Workers call this at start-up: a bundle ``sluice policy check`` rejects
    would otherwise deny everything, or decide with a broken rule, in production.
    """
    report = check(path)
    if report.ok:
        return report
    problems = [*report.errors, *(f"{t.name} {t.message}" for t in report.tests if not t.passed)]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise BundleError(
        f"policy bundle {path} fails `sluice policy check {path}`: {problems[0]}{more}"
    )


def _check_inputs(bundle: Bundle, inputs: InputBuilder, report: Report) -> None:
    passed = set(inputs.fields)
    for name, text in bundle.modules:
        code = _COMMENT.sub("", text)
        for match in _INPUT_REF.finditer(code):
            ref = match.group(1) or match.group(2)
            if ref not in passed:
                report.errors.append(
                    f"{name}: reads input.{ref}, which the gate does not pass "
                    f"(data.gate.input lists {sorted(passed)})"
                )


def _check_sample(policy: LoadedPolicy, report: Report) -> None:
    """The decision for a plain action of an unknown tenant must be well formed."""
    sample = {
        "tenant": "lint-tenant",
        "agent": "assistant",
        "tool": "echo",
        "args": {"text": "hello"},
        "args_kib": 1,
        "url_host": None,
        "amount": None,
        "pii": [],
        "spend": 0,
        "calls_in_window": 0,
        "usage": None,
    }
    document = {name: sample[name] for name in policy.inputs.fields}
    decision = policy.evaluate_input(document)
    if decision.error is None:
        return
    if "undefined" in decision.error:
        report.warnings.append(f"{DECISION_RULE} is undefined for {document}")
    else:
        report.errors.append(f"sample input {document}: {decision.error}")


def run_tests(bundle: Bundle) -> list[TestResult]:
    """Run the ``test_*`` rules of the bundle's ``*_test.rego`` files.

    On the interpreter: tests need ``with``, which the RVM does not compile.
    """
    if not bundle.tests:
        return []
    engine = regorus.Engine()
    try:
        for name, text in (*bundle.modules, *bundle.tests):
            engine.add_policy(name, text)
        engine.add_data_json(bundle.data_json)
    except Exception as exc:
        return [TestResult("(load)", False, regorus_message(exc))]
    results = []
    for name, text in bundle.tests:
        package = _PACKAGE.search(text)
        if package is None:
            results.append(TestResult(name, False, "no package declaration"))
            continue
        for rule in sorted(set(_TEST_RULE.findall(text))):
            query = f"data.{package.group(1)}.{rule}"
            try:
                engine.set_input_json("{}")
                value = engine.eval_rule(query)
            except Exception as exc:
                results.append(TestResult(query, False, regorus_message(exc)))
                continue
            passed = value is True
            results.append(TestResult(query, passed, "" if passed else f"got {value!r}"))
    return results
