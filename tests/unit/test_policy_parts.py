"""The gate's parts: bundles and versions, engines, inputs, decisions, masks, cache, lint, CLI."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from sluicegate.agents.schemas import ActionProposed
from sluicegate.cli_policy import policy as policy_cli
from sluicegate.policy.bundle import BundleError, default_bundle_path, load_bundle, signature
from sluicegate.policy.cache import DecisionCache, cache_key, deterministic
from sluicegate.policy.decision import MalformedDecision, Mask, apply_masks, parse_decision
from sluicegate.policy.engine import UNDEFINED, InterpreterEngine, PolicyCompileError, RvmEngine
from sluicegate.policy.evaluator import LoadedPolicy, Request
from sluicegate.policy.features import InputBuilder, InputTooComplex, luhn_ok, url_host
from sluicegate.policy.lint import check, run_tests
from sluicegate.policy.schemas import ProposedAction, TokenUsage
from sluicegate.policy.testing import copy_reference_bundle, write_bundle

ALLOW = (
    "package sluice.gate\n"
    'decision := {"decision": "allow", "reasons": [], "cost": 1, "masks": []}\n'
)


# -- bundles ------------------------------------------------------------------------------


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    a = load_bundle(write_bundle(tmp_path / "a", {"x.rego": ALLOW}, {"k": 1}))
    b = load_bundle(write_bundle(tmp_path / "b", {"x.rego": ALLOW}, {"k": 1}))
    assert a.version == b.version and a.version.startswith("sha256:") and len(a.version) == 71
    assert (
        load_bundle(write_bundle(tmp_path / "c", {"y.rego": ALLOW}, {"k": 1})).version != a.version
    )
    assert (
        load_bundle(write_bundle(tmp_path / "d", {"x.rego": ALLOW}, {"k": 2})).version != a.version
    )
    assert (
        load_bundle(write_bundle(tmp_path / "e", {"x.rego": ALLOW + "\n"}, {"k": 1})).version
        != a.version
    )


def test_test_files_are_not_part_of_the_bundle(tmp_path: Path) -> None:
    plain = load_bundle(write_bundle(tmp_path / "a", {"x.rego": ALLOW}))
    tested = load_bundle(
        write_bundle(
            tmp_path / "b", {"x.rego": ALLOW, "x_test.rego": "package t\ntest_a := true\n"}
        )
    )
    assert tested.version == plain.version
    assert [name for name, _ in tested.modules] == ["x.rego"]
    assert [name for name, _ in tested.tests] == ["x_test.rego"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no .rego files"),
        ({"x.rego": ALLOW, "data.json": "[1]"}, "JSON object"),
        ({"x.rego": ALLOW, "data.json": "{oops"}, "not valid JSON"),
    ],
)
def test_bad_bundles(tmp_path: Path, files: dict[str, str], message: str) -> None:
    tmp_path.joinpath("b").mkdir()
    for name, text in files.items():
        (tmp_path / "b" / name).write_text(text)
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "missing")


def test_signature_follows_the_files(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b", {"x.rego": ALLOW})
    before = signature(path)
    (path / "y.rego").write_text(ALLOW)
    assert signature(path) != before
    assert signature(tmp_path / "missing") == ()


# -- engines ------------------------------------------------------------------------------


def reference_requests() -> list[Request]:
    cases: list[tuple[str, str, str, dict[str, Any], int, int]] = [
        ("acme", "assistant", "echo", {"text": "hi"}, 0, 0),
        ("acme", "reporter", "calculator", {"expression": "1"}, 0, 0),
        ("acme", "assistant", "http_post", {"url": "https://api.acme.example/"}, 0, 0),
        ("acme", "assistant", "http_post", {"url": "https://evil.example/"}, 0, 0),
        ("acme", "assistant", "http_post", {}, 0, 0),
        ("acme", "assistant", "echo", {"to": "a@b.io", "t": "4111111111111111"}, 0, 0),
        ("acme", "assistant", "shell", {"command": "mail a@b.io"}, 99, 60),
        ("globex", "assistant", "sql_write", {"query": "x"}, 0, 0),
        ("globex", "assistant", "echo", {"text": "555-123-4567 4111111111111111"}, 19, 9),
        ("nobody", "assistant", "search", {"query": "x" * 5000}, 0, 0),
    ]
    requests = [Request(t, a, tool, args, s, c) for t, a, tool, args, s, c in cases]
    # Token budget (globex: 20000 per session; acme: none).
    for tenant, total in (("globex", 20000), ("globex", 20001), ("acme", 10**9)):
        tokens = TokenUsage(total_tokens=10, session_total_tokens=total)
        requests.append(Request(tenant, "assistant", "echo", {}, 0, 0, tokens))
    return requests


def test_rvm_and_interpreter_agree_on_the_reference_policies() -> None:
    bundle = load_bundle(default_bundle_path())
    rvm = LoadedPolicy(bundle, RvmEngine(bundle), cache_size=0)
    interpreter = LoadedPolicy(bundle, InterpreterEngine(bundle), cache_size=0)
    kinds = set()
    for request in reference_requests():
        a, b = rvm.decide(request), interpreter.decide(request)
        assert a.decision.error is None, a.decision.error
        assert (a.decision, a.args) == (b.decision, b.args), request
        kinds.add(a.decision.decision)
    assert kinds == {"allow", "deny", "redact"}


def test_engines_report_undefined_and_refuse_bad_bundles(tmp_path: Path) -> None:
    bundle = load_bundle(
        write_bundle(tmp_path / "b", {"x.rego": "package sluice.gate\ndecision := 1 if input.x\n"})
    )
    for engine in (RvmEngine(bundle), InterpreterEngine(bundle)):
        assert engine.evaluate("{}") is UNDEFINED
        assert engine.evaluate('{"x": true}') == 1
        assert engine.evaluate_many(["{}", '{"x": true}']) == [UNDEFINED, 1]
    missing = load_bundle(write_bundle(tmp_path / "c", {"x.rego": "package other\nx := 1\n"}))
    for make in (RvmEngine, InterpreterEngine):
        with pytest.raises(PolicyCompileError):
            make(missing)


def test_auto_falls_back_to_the_interpreter(tmp_path: Path) -> None:
    # `walk` is not in the RVM compiler yet.
    rego = (
        "package sluice.gate\n"
        "n := count([v | walk(input, [_, v]); is_string(v)])\n"
        'decision := {"decision": "allow", "reasons": [], "cost": n, "masks": []}\n'
    )
    policy = LoadedPolicy.load(write_bundle(tmp_path / "b", {"x.rego": rego}))
    assert policy.engine.mode == "interpreter"
    assert policy.decide(Request("acme", "a", "echo", {}, 0, 0)).decision.decision == "allow"


# -- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("5500000000000004", True),
        ("378282246310005", True),
        ("0", True),
        ("", False),
        ("12a4", False),
        ("١٢٣", False),  # non-ASCII digits
    ],
)
def test_luhn(number: str, valid: bool) -> None:
    assert luhn_ok(number) is valid


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://Api.Example.com/x", "api.example.com"),
        ("http://a.example:8080", "a.example"),
        ("https://good.example@evil.example/", "evil.example"),
        ("https://evil.example\\@good.example/", None),
        ("https://a.example:99999/", None),
        ("javascript:alert(1)", None),
        ("https:///path", None),
        ("https://a.example/\n", None),
        (42, None),
    ],
)
def test_url_host(url: Any, host: str | None) -> None:
    assert url_host(url) == host


def test_input_has_exactly_the_declared_fields() -> None:
    builder = InputBuilder(load_bundle(default_bundle_path()))
    doc = builder.build(
        tenant="acme",
        agent="assistant",
        tool="echo",
        args={"to": "bob@example.com", "list": ["4111 1111 1111 1111"]},
        spend=3,
        calls_in_window=1,
    )
    assert "args" not in doc
    assert doc["args_kib"] == 1
    assert doc["pii"] == [
        {"kind": "email", "path": ["to"], "match": "bob@example.com"},
        {
            "kind": "card",
            "path": ["list", 0],
            "match": "4111 1111 1111 1111",
            "digits": "4111111111111111",
            "luhn": True,
        },
    ]


@pytest.mark.parametrize(
    "text",
    ["a" * 16000, "a@" + "b." * 8000, "1" * 16000, "1 " * 8000, "+1 " * 5000, "a.b@c" * 3000],
)
def test_pii_scan_has_no_catastrophic_backtracking(text: str) -> None:
    # Python's re backtracks; the reference patterns are written so that
    # 16 KB (the largest args an action may carry) scans in milliseconds.
    builder = InputBuilder(load_bundle(default_bundle_path()))
    started = time.perf_counter()
    with contextlib.suppress(InputTooComplex):  # "1 1 1 ..." holds 400 card-like numbers
        builder.find_pii({"text": text})
    # A hang guard, not a speed check: catastrophic backtracking on 16 KB
    # takes hours, a linear scan milliseconds even on a loaded machine.
    assert time.perf_counter() - started < 20


def test_undeclared_field_is_undefined_and_fails_closed(tmp_path: Path) -> None:
    rego = (
        "package sluice.gate\n"
        'decision := {"decision": "allow", "reasons": [], "cost": 1, "masks": []} '
        'if input.args.ok == "yes"\n'
    )
    path = write_bundle(tmp_path / "b", {"x.rego": rego}, {"gate": {"input": ["tool"]}})
    verdict = LoadedPolicy.load(path).decide(Request("acme", "a", "echo", {"ok": "yes"}, 0, 0))
    assert verdict.decision.reasons == ("policy_error",)
    report = check(path)
    assert any("input.args" in e for e in report.errors)


@pytest.mark.parametrize(
    ("gate", "message"),
    [
        ({"input": ["tool", "nope"]}, "unknown fields"),
        ({"pii": {"patterns": {"x": "("}}}, "gate.pii.patterns.x"),
        ({"pii": {"patterns": {"x": "(a)"}}}, "capturing groups"),
        ({"pii": {"patterns": {"x": "a"}, "checksums": {"x": "crc"}}}, "unknown 'crc'"),
    ],
)
def test_bad_gate_data_refused(tmp_path: Path, gate: dict[str, Any], message: str) -> None:
    path = write_bundle(tmp_path / "b", {"x.rego": ALLOW}, {"gate": gate})
    with pytest.raises(BundleError, match=message):
        LoadedPolicy.load(path)


def test_proposed_action_model_matches_agents() -> None:
    data = {
        "task_id": "t",
        "agent": "a",
        "action_index": 1,
        "action_count": 2,
        "tool": "echo",
        "args": {"x": 1},
        "task_time": "2025-01-01T00:00:00Z",
    }
    assert (
        ProposedAction.model_validate(data).model_dump()
        == ActionProposed.model_validate(data).model_dump()
    )
    for bad in ({**data, "action_index": 2}, {**data, "extra": 1}, {**data, "tool": "1x"}):
        with pytest.raises(ValueError):
            ProposedAction.model_validate(bad)


# -- decisions and masks ------------------------------------------------------------------


def test_parse_normalises() -> None:
    raw: dict[str, Any] = {
        "decision": "redact",
        "reasons": ["b_code", "a_code", "a_code"],
        "cost": 2,
        "masks": [
            {"path": ["t"], "match": "y", "mask": "[y]"},
            {"path": ["t", 0.0], "match": "x", "mask": "[x]"},
            {"path": ["t"], "match": "y", "mask": "[y]"},
        ],
    }
    decision = parse_decision(raw, "v")
    assert decision.reasons == ("a_code", "b_code")
    assert decision.masks == (Mask(("t", 0), "x", "[x]"), Mask(("t",), "y", "[y]"))
    assert parse_decision({**raw, "masks": list(reversed(raw["masks"]))}, "v") == decision


def test_masks_applied_in_one_pass() -> None:
    text = "call 555-1234 or 555-1234-99, mail x@y.io"
    args: dict[str, Any] = {"t": text, "n": [{"s": "x@y.io"}], "k": 1}
    masks = (
        Mask(("t",), "555-1234", "[p]"),
        Mask(("t",), "555-1234-99", "[long]"),
        Mask(("t",), "x@y.io", "[x@y.io]"),  # a mask containing its match is not re-masked
        Mask(("n", 0, "s"), "x@y.io", "[e]"),
    )
    out = apply_masks(args, masks)
    assert out == {"t": "call [p] or [long], mail [x@y.io]", "n": [{"s": "[e]"}], "k": 1}
    assert args["t"] == text, "the input is not modified"
    with pytest.raises(MalformedDecision):
        apply_masks(args, (Mask(("k",), "1", "x"),))
    with pytest.raises(MalformedDecision):
        apply_masks(args, (Mask(("n", 5, "s"), "x", "y"),))


# -- cache --------------------------------------------------------------------------------


def test_cache_is_bounded_and_keys_large_inputs_by_digest() -> None:
    cache: DecisionCache[int] = DecisionCache(2)
    for n in range(3):
        cache.put(bytes([n]), n)
    assert len(cache) == 2 and cache.get(b"\x00") is None and cache.get(b"\x02") == 2
    assert (cache.hits, cache.misses) == (1, 1)
    small, large = b'{"a":1}', orjson.dumps({"a": "x" * 1000})
    assert cache_key(small) == small
    assert len(cache_key(large)) == 17 and cache_key(large) != cache_key(large + b" ")


def test_nondeterministic_bundle_gets_no_cache(tmp_path: Path) -> None:
    rego = ALLOW + "t := time.now_ns()\n"
    bundle = load_bundle(write_bundle(tmp_path / "b", {"x.rego": rego}))
    assert not deterministic(bundle)
    assert LoadedPolicy.from_bundle(bundle).cache.size == 0
    assert deterministic(load_bundle(default_bundle_path()))


# -- lint and Rego tests ------------------------------------------------------------------


def test_reference_bundle_passes_its_checks_and_rego_tests() -> None:
    report = check(default_bundle_path())
    assert report.ok, (report.errors, [t for t in report.tests if not t.passed])
    assert report.engine == "rvm"
    assert len(report.tests) >= 10
    assert not report.warnings


def test_failing_rego_test_is_reported(tmp_path: Path) -> None:
    test = 'package t\nimport data.sluice.gate\ntest_denies if gate.decision.decision == "deny"\n'
    path = write_bundle(tmp_path / "b", {"x.rego": ALLOW, "x_test.rego": test})
    [result] = run_tests(load_bundle(path))
    assert not result.passed and result.name == "data.t.test_denies"
    assert not check(path).ok


def test_check_reports_malformed_sample_decision(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b", {"x.rego": 'package sluice.gate\ndecision := "yes"\n'})
    report = check(path)
    assert any("malformed" in e for e in report.errors)


# -- CLI ----------------------------------------------------------------------------------


def test_cli_check() -> None:
    result = CliRunner().invoke(policy_cli, ["check"])
    assert result.exit_code == 0, result.output
    assert load_bundle(default_bundle_path()).version in result.output
    assert "0 failed" in result.output


def test_cli_check_broken(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "b", {"x.rego": "package sluice.gate\ndecision := {"})
    result = CliRunner().invoke(policy_cli, ["check", str(path)])
    assert result.exit_code == 1
    assert "does not compile" in result.output


# A `sluice policy test` line of the input shape: a policy input document.
INPUT_LINE: dict[str, Any] = {
    "tenant": "acme",
    "agent": "a",
    "tool": "echo",
    "args": {},
    "args_kib": 1,
    "url_host": None,
    "pii": [],
    "spend": 0,
    "calls_in_window": 0,
}


def test_cli_test_json(tmp_path: Path) -> None:
    lines = [
        {
            "task_id": "t",
            "action_index": 0,
            "action_count": 1,
            "tool": "echo",
            "args": {"to": "a@b.io"},
        },
        {**INPUT_LINE, "tool": "shell"},
        {
            "type": "action.proposed",
            "tenant": "globex",
            "session": "s",
            "data": {
                "task_id": "t",
                "action_index": 0,
                "action_count": 1,
                "tool": "echo",
                "args": {"to": "a@b.io"},
            },
        },
    ]
    file = tmp_path / "in.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    bundle = copy_reference_bundle(tmp_path / "bundle")
    result = CliRunner().invoke(policy_cli, ["test", str(bundle), "--input", str(file), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["decision"] for r in rows] == ["redact", "deny", "allow"]
    assert [r["shape"] for r in rows] == ["action", "input", "event"]
    assert rows[0]["args"] == {"to": "[email]"}
    assert rows[1]["reasons"] == ["dangerous_tool", "tool_not_allowed"]
    assert rows[2]["args"] == {"to": "a@b.io"}, "globex does not redact e-mail"
    assert {r["policy_version"] for r in rows} == {load_bundle(bundle).version}


def test_cli_test_decides_on_usage(tmp_path: Path) -> None:
    usage = {"total_tokens": 10, "session_total_tokens": 20001}
    action = {"tool": "echo", "args": {}, "usage": usage}
    lines = [
        action,
        {"type": "action.proposed", "tenant": "globex", "data": action},
        {**INPUT_LINE, "tenant": "globex", "usage": usage},
        {"tool": "echo", "args": {}, "usage": {"total_tokens": 10}},
    ]
    file = tmp_path / "in.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = CliRunner().invoke(policy_cli, ["test", "--input", str(file), "--tenant", "globex"])
    assert result.exit_code == 1
    rows = [line.split()[:3] for line in result.stdout.splitlines() if line[:1] != "#"]
    denied = ["deny", "token_budget_exceeded"]
    assert rows == [["action", *denied], ["event", *denied], ["input", *denied]]
    assert "line 4: error: action: lacks usage.session_total_tokens" in result.output


def test_cli_test_text_and_bad_lines(tmp_path: Path) -> None:
    file = tmp_path / "in.jsonl"
    file.write_text('{"tool": "echo", "args": {}}\nnot json\n[1]\n')
    result = CliRunner().invoke(policy_cli, ["test", "--input", str(file)])
    assert result.exit_code == 1
    assert result.output.splitlines()[1].startswith("action allow ")
    assert "line 2: error" in result.output and "line 3: error" in result.output


@pytest.mark.parametrize(
    ("line", "error"),
    [
        # A plain action with a tenant reads as a policy input, which lacks most fields.
        (
            {"tenant": "acme", "agent": "a", "tool": "echo", "args": {}},
            "policy input: lacks args_kib, url_host, pii, spend, calls_in_window",
        ),
        (
            {**INPUT_LINE, "pii": [{"type": "email"}]},
            "policy input: lacks pii.0.kind, pii.0.path, pii.0.match; has unknown pii.0.type",
        ),
        ({"agent": "a", "args": {}}, "matches no shape"),
        ({"type": "task.submitted", "data": {}}, "an event line must be of type action.proposed"),
    ],
)
def test_cli_test_refuses_a_line_of_no_shape(
    tmp_path: Path, line: dict[str, object], error: str
) -> None:
    file = tmp_path / "in.jsonl"
    file.write_text(json.dumps(line) + "\n")
    result = CliRunner().invoke(policy_cli, ["test", "--input", str(file)])
    assert result.exit_code == 1
    assert f"line 1: error: {error}" in result.output


def test_arguments_that_are_not_json_are_denied() -> None:
    policy = LoadedPolicy.load(default_bundle_path())
    verdict = policy.decide(Request("acme", "a", "echo", {"x": {1, 2}}, 0, 0))
    assert verdict.decision.reasons == ("policy_error",)
    assert verdict.args == {}
