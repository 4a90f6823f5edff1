"""The ``refund`` tool: pays an amount back on an order (in this reference, on paper).

It stands in for the kind of action a person should sign off: the reference
policy allows a refund up to the tenant's threshold and holds a larger one
for approval (``sluice approvals``). Deterministic and without side effects
here; a real one would call the payment system with the action's id as its
idempotency key (the tools step never runs one action twice anyway).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sluicegate.agents.tools.base import JSON, ToolContext, ToolError, string_arg

MAX_AMOUNT = 1_000_000
ORDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def amount_arg(args: Mapping[str, Any]) -> int | float:
    """``args["amount"]``: a positive, finite number up to MAX_AMOUNT, or ToolError."""
    amount = args.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ToolError("argument 'amount' must be a number")
    if not (math.isfinite(amount) and 0 < amount <= MAX_AMOUNT):
        raise ToolError(f"argument 'amount' must be above 0 and at most {MAX_AMOUNT}")
    return amount


async def run(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
    amount = amount_arg(args)
    order = string_arg(args, "order", max_chars=64)
    if not ORDER.fullmatch(order):
        raise ToolError("argument 'order' must be an order number (letters, digits, - and _)")
    shown = f"{amount:g}" if isinstance(amount, float) else str(amount)
    return {
        "order": order,
        "amount": amount,
        "refunded": True,
        "summary": f"refunded {shown} on order {order}",
    }
