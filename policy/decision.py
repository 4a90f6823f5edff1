"""The gate's decision model, and the strict check of what a policy returns.

A decision is ``allow``, ``deny``, ``redact`` (allow with arguments
rewritten) or ``hold`` (a person must approve it first; arguments masked as
for a redact), with machine-readable reason codes, the cost to charge, the
masks to apply and the version of the bundle that made it. The policy's
output is untrusted: :func:`parse_decision` accepts only the documented
shape (see ``policy/rego/gate.rego``) and anything else raises
:class:`MalformedDecision`, which the gate turns into a deny with
``policy_error``. :func:`apply_masks` rewrites arguments by those masks, and
refuses masks that do not point at text in the arguments.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from sluicegate.streams.errors import SluiceError

DecisionKind = Literal["allow", "deny", "redact", "hold"]
PathItem = str | int

ALLOW: Final = "allow"
DENY: Final = "deny"
REDACT: Final = "redact"
HOLD: Final = "hold"

# Reason codes of the reference policies; a policy may add its own, as long
# as they look like codes (REASON_CODE).
TOOL_NOT_ALLOWED: Final = "tool_not_allowed"
DANGEROUS_TOOL: Final = "dangerous_tool"
HOST_NOT_ALLOWED: Final = "host_not_allowed"
BUDGET_EXCEEDED: Final = "budget_exceeded"
RATE_LIMITED: Final = "rate_limited"
ARGS_TOO_LARGE: Final = "args_too_large"
PII_REDACTED: Final = "pii_redacted"
# Set by the gate, never trusted from a policy: the decision could not be made.
POLICY_ERROR: Final = "policy_error"

REASON_CODE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_REASONS: Final = 32
MAX_MASKS: Final = 256
MAX_PATH_DEPTH: Final = 32
MAX_MASK_CHARS: Final = 256
MAX_COST: Final = 1e12
MAX_DETAIL_BYTES: Final = 2048
_KEYS: Final = frozenset({"decision", "reasons", "cost", "masks", "detail"})


class MalformedDecision(SluiceError, ValueError):
    """The policy's output is not a decision the gate can act on."""


@dataclass(frozen=True, slots=True)
class Mask:
    """Replace ``match`` by ``mask`` in the string at ``path`` of the arguments."""

    path: tuple[PathItem, ...]
    match: str
    mask: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gate does with one proposed action."""

    decision: DecisionKind
    reasons: tuple[str, ...]
    policy_version: str
    cost: int | float = 0
    masks: tuple[Mask, ...] = ()
    # Free-form policy detail (bounded), for the audit row.
    detail: Mapping[str, Any] | None = None
    # For policy_error: what went wrong, for the audit row and the logs.
    error: str | None = None

    @property
    def allowed(self) -> bool:
        """Goes to the tools now (a hold does only once a person approves it)."""
        return self.decision in (ALLOW, REDACT)

    @property
    def charged(self) -> bool:
        """Carries a cost: allowed, or held (charged when approved)."""
        return self.decision != DENY

    def outcome(self) -> tuple[Any, ...]:
        """Everything that is enforced, for comparing a shadow decision with the live one."""
        return (self.decision, self.reasons, self.cost if self.charged else 0, self.masks)

    def summary(self) -> dict[str, Any]:
        """A JSON view for audit rows. Masks show where and how, never the matched text."""
        out: dict[str, Any] = {
            "decision": self.decision,
            "reasons": list(self.reasons),
            "policy_version": self.policy_version,
        }
        if self.charged:
            out["cost"] = self.cost
        if self.masks:
            out["masks"] = [{"path": list(m.path), "mask": m.mask} for m in self.masks]
        if self.detail:
            out["detail"] = dict(self.detail)
        if self.error:
            out["error"] = self.error
        return out


def policy_error(version: str, error: str) -> Decision:
    """The fail-closed decision: deny, because no valid decision could be made."""
    return Decision(decision=DENY, reasons=(POLICY_ERROR,), policy_version=version, error=error)


def parse_decision(raw: Any, version: str) -> Decision:
    """``raw`` (the policy's output, as JSON) as a :class:`Decision`, or MalformedDecision."""
    if not isinstance(raw, dict):
        raise MalformedDecision(f"decision must be an object, got {_kind(raw)}")
    extra = set(raw) - _KEYS
    if extra:
        raise MalformedDecision(f"decision has unknown keys {sorted(extra)}")
    kind = raw.get("decision")
    if kind not in (ALLOW, DENY, REDACT, HOLD):
        raise MalformedDecision(f"decision must be allow, deny, redact or hold, got {kind!r}")
    reasons = _reasons(raw.get("reasons", []))
    masks = _masks(raw.get("masks", []))
    detail = _detail(raw.get("detail"))
    if kind == DENY:
        if not reasons:
            raise MalformedDecision("a deny must give at least one reason")
        return Decision(DENY, reasons, version, 0, masks, detail)
    cost = _cost(raw.get("cost"))
    if kind == ALLOW and (reasons or masks):
        raise MalformedDecision("an allow carries no reasons and no masks (that is a redact)")
    if kind == REDACT and not (reasons and masks):
        raise MalformedDecision("a redact must give reasons and at least one mask")
    if kind == HOLD and not reasons:
        raise MalformedDecision("a hold must give at least one reason")
    return Decision(kind, reasons, version, cost, masks, detail)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _reasons(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_REASONS:
        raise MalformedDecision(f"reasons must be a list of at most {MAX_REASONS} codes")
    if not value:
        return ()
    for code in value:
        if not isinstance(code, str) or not REASON_CODE.fullmatch(code):
            raise MalformedDecision(f"reason {code!r} is not a reason code ({REASON_CODE.pattern})")
        if code == POLICY_ERROR:
            raise MalformedDecision(f"{POLICY_ERROR} is the gate's own reason")
    return tuple(sorted(set(value)))


def _cost(value: Any) -> int | float:
    # bool is an int in Python, and never a cost.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedDecision(f"cost must be a number, got {_kind(value)}")
    if not (math.isfinite(value) and 0 <= value <= MAX_COST):
        raise MalformedDecision(f"cost {value!r} is out of range [0, {MAX_COST:g}]")
    return value


def _masks(value: Any) -> tuple[Mask, ...]:
    if not isinstance(value, list) or len(value) > MAX_MASKS:
        raise MalformedDecision(f"masks must be a list of at most {MAX_MASKS} masks")
    if not value:
        return ()
    masks = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"path", "match", "mask"}:
            raise MalformedDecision(f"mask {item!r} must have exactly path, match and mask")
        match, mask = item["match"], item["mask"]
        if not isinstance(match, str) or not match:
            raise MalformedDecision("a mask's match must be a non-empty string")
        if not isinstance(mask, str) or len(mask) > MAX_MASK_CHARS:
            raise MalformedDecision(f"a mask's mask must be a string of <= {MAX_MASK_CHARS} chars")
        masks.append(Mask(_path(item["path"]), match, mask))
    # Sets come back from Rego in its own order; sort so equal decisions compare equal.
    return tuple(sorted(set(masks), key=lambda m: (orjson.dumps(m.path), m.match, m.mask)))


def _path(value: Any) -> tuple[PathItem, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_PATH_DEPTH:
        raise MalformedDecision(f"a mask's path must be a list of 1..{MAX_PATH_DEPTH} keys")
    path: list[PathItem] = []
    for key in value:
        if isinstance(key, str):
            path.append(key)
        elif isinstance(key, int | float) and not isinstance(key, bool) and float(key).is_integer():
            # Rego numbers may come back as floats; list indexes are whole.
            path.append(int(key))
        else:
            raise MalformedDecision(f"path key {key!r} is neither a string nor an index")
    return tuple(path)


def _detail(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(orjson.dumps(value)) > MAX_DETAIL_BYTES:
        raise MalformedDecision(f"detail must be an object of <= {MAX_DETAIL_BYTES} bytes")
    return value


def apply_masks(args: Mapping[str, Any], masks: tuple[Mask, ...]) -> dict[str, Any]:
    """A copy of ``args`` with every mask applied; MalformedDecision if one does not fit.

    Every match must occur in the original string at its path. The matches
    of one string are replaced in a single pass, longest first, so a mask
    never rewrites another mask's text, and a match inside a longer one is
    covered by the longer one.
    """
    if not masks:
        return dict(args)
    by_path: dict[tuple[PathItem, ...], dict[str, str]] = defaultdict(dict)
    for m in masks:
        by_path[m.path][m.match] = m.mask
    rewritten: dict[str, Any] = orjson.loads(orjson.dumps(args))  # a deep copy of JSON
    for path, table in by_path.items():
        parent: Any = rewritten
        for key in path[:-1]:
            parent = _child(parent, key, path)
        text = _child(parent, path[-1], path)
        if not isinstance(text, str):
            raise MalformedDecision(f"mask path {list(path)} is not a string in the arguments")
        missing = [match for match in table if match not in text]
        if missing:
            raise MalformedDecision(f"mask match not found at {list(path)}")
        parent[path[-1]] = _replace_all(text, table)
    return rewritten


def _replace_all(text: str, table: Mapping[str, str]) -> str:
    """``text`` with every key of ``table`` replaced by its value, in one pass."""
    pattern = re.compile("|".join(map(re.escape, sorted(table, key=len, reverse=True))))
    return pattern.sub(lambda found: table[found.group(0)], text)


def _child(container: Any, key: PathItem, path: tuple[PathItem, ...]) -> Any:
    if isinstance(container, dict) and isinstance(key, str) and key in container:
        return container[key]
    if isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container):
        return container[key]
    raise MalformedDecision(f"mask path {list(path)} does not exist in the arguments")
