"""The policy input: what the gate computes from an action before evaluation.

The policy reads facts, not raw text, where Rego would be slow or error-prone:

- ``url_host``: the host of ``args.url`` for http(s) URLs, parsed once here;
- ``pii``: PII candidates in every string of ``args``, found with the
  bundle's patterns (``data.gate.pii.patterns``, Python ``re`` syntax) and,
  for the kinds under ``data.gate.pii.checksums``, whether they pass the Luhn
  check. regorus compiles a regex on every call (35-600 us each, measured),
  and a Luhn sum is plain arithmetic, so both live here; the policy decides
  which kinds a tenant redacts and how the mask reads;
- ``amount``: ``args.amount`` when it is a finite number (not a bool), else
  null: a refund's amount, which a policy compares with a threshold without
  reading (and caching on) the rest of the arguments;
- ``args_kib``: the size of ``args`` as compact JSON, in KiB rounded up. Whole
  KiB because a limit in KiB is then exact while decisions are reused across
  argument sizes (exact byte counts made most cache keys unique).
- ``usage``: the model tokens behind the plan, as the planner sent them on
  ``action.proposed`` (``{"total_tokens", "session_total_tokens"}``), or null
  for an action planned without a model. ``session_total_tokens`` is the
  session's running total in the planner's keyed state, which is per
  (tenant, session) like the gate's own: a token budget is set per tenant
  and applied per session (see :mod:`policy.ledger` for why no tenant-wide
  total). Each session total is a new input, so a model-planned action is
  seldom a cache hit while ``usage`` is declared; rule-planned ones (null)
  still are.

The bundle may declare which input fields its policy reads
(``data.gate.input``); the gate then passes only those. That matters because
decisions are cached keyed on the whole input: a policy that never reads
``args`` gets cache hits across different argument texts, and one that does
read it but does not declare it sees it undefined and fails closed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from sluicegate.policy.bundle import Bundle, BundleError
from sluicegate.streams.errors import SluiceError

# Every field the gate can provide, in the order documented in gate.rego.
INPUT_FIELDS: Final = (
    "tenant",
    "agent",
    "tool",
    "args",
    "args_kib",
    "url_host",
    "amount",
    "pii",
    "spend",
    "calls_in_window",
    "usage",
)
CHECKSUMS: Final = frozenset({"luhn"})
# Characters on which URL parsers disagree (see url_host).
_UNSAFE_IN_URL: Final = re.compile(r"[\x00-\x20\x7f\\]")
# Bounds on the scan. Beyond them the gate cannot vouch that every PII
# candidate was found, so it raises InputTooComplex and the action is denied
# (policy_error) rather than passed with text nobody looked at.
MAX_DEPTH: Final = 32
MAX_FINDINGS: Final = 128

PathItem = str | int


class InputTooComplex(SluiceError, ValueError):
    """The arguments are nested too deep, or hold too much PII, to be scanned."""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits (card numbers): True if it passes."""
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def url_host(value: Any) -> str | None:
    """The lower-cased host of an http(s) URL, or None if ``value`` is not one.

    ``urlsplit`` skips userinfo, so "https://api.example@evil.example/" is
    evil.example. Whitespace, control characters and backslashes anywhere
    refuse the URL: parsers disagree on them (browsers read "\\" as "/", so
    "https://evil.example\\@good.example/" goes to evil.example, while
    ``urlsplit`` says good.example), and the tool must reach the host judged here.
    """
    if not isinstance(value, str) or not value or _UNSAFE_IN_URL.search(value):
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    return host


def amount_of(value: Any) -> int | float | None:
    """``value`` if it is a finite number (bool is not one), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def strings_in(value: Any) -> list[tuple[list[PathItem], str]]:
    """Every string in a JSON value (not keys), with its path, in document order.

    Raises InputTooComplex for values nested deeper than MAX_DEPTH.
    """
    found: list[tuple[list[PathItem], str]] = []
    _collect(value, [], found)
    return found


def _collect(value: Any, path: list[PathItem], found: list[tuple[list[PathItem], str]]) -> None:
    # A loop over items with a type check per item: most arguments are one
    # flat object of strings, and this is on every decision's path.
    if isinstance(value, dict):
        items: Iterable[tuple[PathItem, Any]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        if isinstance(value, str):
            found.append((path, value))
        return
    if len(path) >= MAX_DEPTH:
        raise InputTooComplex(f"arguments nest deeper than {MAX_DEPTH} levels")
    for key, item in items:
        if isinstance(item, str):
            found.append(([*path, key], item))
        elif isinstance(item, dict | list):
            _collect(item, [*path, key], found)


@dataclass(frozen=True, slots=True)
class PiiPattern:
    kind: str
    regex: re.Pattern[str]
    checksum: str | None


class InputBuilder:
    """Builds policy inputs for one bundle (its PII patterns and declared fields)."""

    def __init__(self, bundle: Bundle) -> None:
        gate = bundle.data.get("gate", {})
        if not isinstance(gate, dict):
            raise BundleError("data.json: gate must be an object")
        self.patterns = _patterns(gate.get("pii", {}))
        self._scanners = [(p.kind, p.regex.findall, p.checksum) for p in self.patterns]
        self.fields = _fields(gate.get("input"))
        self._want_args = "args" in self.fields
        self._want_pii = "pii" in self.fields
        self._want_host = "url_host" in self.fields
        self._want_amount = "amount" in self.fields
        # The always-computed (cheap) fields the policy did not declare.
        self._drop = tuple(
            f
            for f in ("tenant", "agent", "tool", "args_kib", "spend", "calls_in_window", "usage")
            if f not in self.fields
        )

    def build(
        self,
        *,
        tenant: str,
        agent: str,
        tool: str,
        args: Mapping[str, Any],
        spend: int | float,
        calls_in_window: int,
        usage: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """The policy input for one action, with only the declared fields."""
        document: dict[str, Any] = {
            "tenant": tenant,
            "agent": agent,
            "tool": tool,
            "args_kib": -(-len(orjson.dumps(args)) // 1024),
            "spend": spend,
            "calls_in_window": calls_in_window,
            "usage": None if usage is None else dict(usage),
        }
        if self._want_args:
            document["args"] = args
        if self._want_host:
            document["url_host"] = url_host(args.get("url"))
        if self._want_amount:
            document["amount"] = amount_of(args.get("amount"))
        if self._want_pii:
            document["pii"] = self.find_pii(args)
        if self._drop:
            for name in self._drop:
                del document[name]
        return document

    def find_pii(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        """PII candidates in the strings of ``args``, in a stable order.

        Raises InputTooComplex past the scan's bounds.
        """
        findings: list[dict[str, Any]] = []
        if not self.patterns:
            return findings
        for path, text in strings_in(args):
            for kind, findall, checksum in self._scanners:
                for found in findall(text):
                    finding: dict[str, Any] = {"kind": kind, "path": path, "match": found}
                    if checksum == "luhn":
                        digits = "".join(c for c in found if c.isdigit())
                        finding["digits"] = digits
                        finding["luhn"] = luhn_ok(digits)
                    findings.append(finding)
                    if len(findings) > MAX_FINDINGS:
                        raise InputTooComplex(f"more than {MAX_FINDINGS} PII candidates")
        return findings


def _patterns(pii: Any) -> tuple[PiiPattern, ...]:
    if not isinstance(pii, dict):
        raise BundleError("data.json: gate.pii must be an object")
    patterns, checksums = pii.get("patterns", {}), pii.get("checksums", {})
    if not isinstance(patterns, dict) or not isinstance(checksums, dict):
        raise BundleError("data.json: gate.pii.patterns and gate.pii.checksums must be objects")
    compiled = []
    for kind, source in sorted(patterns.items()):
        if not isinstance(source, str):
            raise BundleError(f"data.json: gate.pii.patterns.{kind} must be a string")
        try:
            # ASCII: \d and \w mean what the patterns' authors expect, and
            # stay fast. No capturing groups, so findall returns whole matches.
            regex = re.compile(source, re.ASCII)
        except re.error as exc:
            raise BundleError(f"data.json: gate.pii.patterns.{kind}: {exc}") from None
        if regex.groups:
            raise BundleError(
                f"data.json: gate.pii.patterns.{kind} has capturing groups; use (?:...)"
            )
        checksum = checksums.get(kind)
        if checksum is not None and checksum not in CHECKSUMS:
            raise BundleError(f"data.json: gate.pii.checksums.{kind}: unknown {checksum!r}")
        compiled.append(PiiPattern(kind, regex, checksum))
    return tuple(compiled)


def _fields(declared: Any) -> tuple[str, ...]:
    if declared is None:
        return INPUT_FIELDS
    if not isinstance(declared, list) or not all(isinstance(f, str) for f in declared):
        raise BundleError("data.json: gate.input must be a list of input field names")
    unknown = sorted(set(declared) - set(INPUT_FIELDS))
    if unknown:
        raise BundleError(
            f"data.json: gate.input names unknown fields {unknown}; known: {list(INPUT_FIELDS)}"
        )
    return tuple(f for f in INPUT_FIELDS if f in declared)
