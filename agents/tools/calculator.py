"""The ``calculator`` tool: safe arithmetic without ``eval``.

The expression is parsed with :mod:`ast` and every node is checked against a
whitelist (numbers, + - * / // % **, unary plus and minus, parentheses)
before anything is evaluated, so names, calls, attributes, subscripts,
strings and comprehensions are rejected outright. Length, node count,
exponent and result size are bounded, so a short expression cannot make the
worker compute a gigantic integer.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

from sluicegate.agents.tools.base import JSON, ToolContext, ToolError, string_arg

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 120
MAX_EXPONENT = 128
# Integers beyond this many bits are refused: big enough for any everyday
# sum, small enough that multiplying two of them is instant.
MAX_INT_BITS = 1024

Number = int | float


class CalculatorError(ToolError):
    """The expression is not allowed or cannot be evaluated."""


def _pow(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    # Estimate before computing: bits(base ** e) <= bits(base) * e.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and base.bit_length() * exponent > MAX_INT_BITS
    ):
        raise CalculatorError("result is too large")
    result: Any = base**exponent
    if isinstance(result, complex):
        raise CalculatorError("result is not a real number")
    return _checked(result)


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_ALLOWED: frozenset[type[ast.AST]] = frozenset(
    {ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, *_BINARY, *_UNARY}
)


def _checked(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is out of range")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("result is too large")
    return value


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int subclass, but True is no number.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"{value!r} is not a number")
        return _checked(value)
    if isinstance(node, ast.UnaryOp):
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is out of range") from None
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or :class:`CalculatorError`."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("not a valid arithmetic expression") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise CalculatorError("expression is too complex")
    # The whole tree is checked before any of it is evaluated.
    for node in nodes:
        if type(node) not in _ALLOWED:
            raise CalculatorError(f"{type(node).__name__} is not allowed in an expression")
    assert isinstance(tree, ast.Expression)
    return _eval(tree.body)


def format_number(value: Number) -> str:
    return str(value) if isinstance(value, int) else f"{value:.12g}"


async def run(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
    expression = string_arg(args, "expression", max_chars=MAX_EXPRESSION_CHARS)
    value = evaluate(expression)
    text = expression.strip()
    return {"expression": text, "value": value, "summary": f"{text} = {format_number(value)}"}
