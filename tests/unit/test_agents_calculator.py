from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sluicegate.agents.tools import ToolContext, ToolError, calculator
from sluicegate.agents.tools.calculator import MAX_EXPRESSION_CHARS, CalculatorError, evaluate

CTX = ToolContext(
    now=datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    tenant="acme",
    session="s1",
    task_id="t1",
    agent="assistant",
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2+2", 4),
        ("2 + 3 * 4", 14),
        ("(1 + 2) * 3", 9),
        ("-3 + 5", 2),
        ("--3", 3),
        ("+4", 4),
        ("-(2 + 3)", -5),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("1.5 * 2", 3.0),
        (".5 + 0.25", 0.75),
        ("10 ** 100", 10**100),
        ("((((1))))", 1),
        (" 6 * 7 ", 42),
    ],
)
def test_evaluates_arithmetic(expression: str, value: float) -> None:
    result = evaluate(expression)
    assert result == value
    assert type(result) is type(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "x + 1",
        "abs(-1)",
        "(1).real",
        "a.b",
        "'a' * 3",
        "[1, 2]",
        "{1: 2}",
        "True + 1",
        "None",
        "1j * 2",
        "lambda: 1",
        "2 if 1 else 3",
        "1 < 2",
        "1 and 2",
        "1 << 100",
        "~1",
        "(1, 2)",
        "[x for x in ()]",
        "import os",
        "1 +",
        "",
        "   ",
    ],
)
def test_rejects_what_is_not_arithmetic(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "2 ** 99999",
        "9 ** 9 ** 9",
        "10 ** 1000",
        "99999999999 ** 128",
        "(10 ** 100) * (10 ** 100) * (10 ** 100) * (10 ** 100)",
        "1e308 * 10",
        "2.0 ** 1e10",
        "1e300 ** 100",
        "(-8) ** 0.5",
        "1 / 0",
        "1 // 0",
        "2 % 0",
        "0 ** -1",
    ],
)
def test_rejects_huge_or_undefined_results(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_rejects_long_and_complex_expressions() -> None:
    with pytest.raises(CalculatorError, match="longer"):
        evaluate("1" + "+1" * MAX_EXPRESSION_CHARS)
    with pytest.raises(CalculatorError, match="complex"):
        evaluate("+".join("1" for _ in range(90)))
    # Deep nesting fails cleanly, not with a crash of the parser or evaluator.
    with pytest.raises(CalculatorError):
        evaluate("(" * 150 + "1" + ")" * 150)


async def test_tool_reports_expression_value_and_summary() -> None:
    out = await calculator.run({"expression": " 7 / 2 "}, CTX)
    assert out == {"expression": "7 / 2", "value": 3.5, "summary": "7 / 2 = 3.5"}


@pytest.mark.parametrize("args", [{}, {"expression": 42}, {"expression": ""}, {"expr": "1+1"}])
async def test_tool_rejects_bad_arguments(args: dict[str, object]) -> None:
    with pytest.raises(ToolError):
        await calculator.run(args, CTX)
