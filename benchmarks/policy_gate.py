"""Policy gate benchmark: decisions/s uncached, cached and batched, and process() per event.

Run: ``.venv/bin/python benchmarks/policy_gate.py [--events N] [--json FILE]``.

The input mix imitates the reference planner's output over many sessions
(see ``workload``): tenants acme / globex / unknown ones, tools weighted
towards search and echo, a few http_post (half to hosts outside the
allowlist) and dangerous tools, free-text arguments of varying length, one
in ten with PII (e-mail, phone, card numbers, valid or not), event times a
few seconds apart per session so spend and the rate window evolve. The
requests are recorded by running the stream through the gate once, so every
variant decides on the same requests, with realistic ledger values.

Variants:
- ``uncached``: ``LoadedPolicy.decide`` with the cache off (RVM), one at a time;
- ``uncached_interpreter``: the same on regorus' interpreter;
- ``engine_only``: the RVM evaluating pre-built input JSON, no Python around it;
- ``batched_interpreter``: one interpreter call per batch of 100 inputs
  (``decision with input as x`` over a list: the RVM has no ``with``);
- ``cached``: ``decide`` with the decision cache, cold at the start;
- ``process``: the gate step's ``process()`` per event, with a fresh Context
  (cache on), against ``AllowAllGate.process()`` as the floor of any gate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import regorus

from sluicegate.agents.gate import AllowAllGate
from sluicegate.agents.schemas import ActionProposed
from sluicegate.policy.bundle import default_bundle_path, load_bundle
from sluicegate.policy.engine import DECISION_RULE, InterpreterEngine, Mode, compile_bundle
from sluicegate.policy.evaluator import LoadedPolicy, Request
from sluicegate.policy.gate import PolicyGate
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "weather",
    "report",
    "invoice",
    "quarterly",
    "summary",
    "status",
    "deploy",
]
PII = [
    "contact bob.smith@example.com today",
    "call me at 555-123-4567",
    "card 4111 1111 1111 1111 please",
    "order 4111 1111 1111 1112 shipped",  # fails Luhn: not redacted
    "ring +44 20 7946 0958",
]
TOOLS = [
    ("search", 35),
    ("echo", 25),
    ("calculator", 15),
    ("clock", 10),
    ("http_post", 10),
    ("shell", 3),
    ("sql_write", 2),
]
TENANTS = [("acme", 50), ("globex", 20), ("initech", 15), ("umbrella", 15)]


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rng.choice(PII)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))


def _args(rng: random.Random, tool: str) -> dict[str, Any]:
    if tool == "search":
        return {"query": _text(rng)}
    if tool == "echo":
        return {"text": _text(rng)}
    if tool == "calculator":
        return {"expression": f"{rng.randint(1, 99)} * {rng.randint(1, 99)}"}
    if tool == "clock":
        return {}
    if tool == "http_post":
        host = rng.choice(["api.acme.example", "x.hooks.acme.example", "evil.example"])
        return {"url": f"https://{host}/v1/{rng.randint(1, 9)}", "body": _text(rng)}
    if tool == "shell":
        return {"command": "ls -la"}
    return {"query": "DELETE FROM users"}


def workload(events: int, seed: int = 7) -> list[Event]:
    """``events`` action.proposed events over events/8 sessions, in time order per session."""
    rng = random.Random(seed)
    sessions = max(1, events // 8)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    clocks = [start + timedelta(seconds=rng.randint(0, 600)) for _ in range(sessions)]
    tenants = [_pick(rng, TENANTS) for _ in range(sessions)]
    out = []
    for i in range(events):
        s = rng.randrange(sessions)
        clocks[s] += timedelta(seconds=rng.uniform(0.2, 8.0))
        tool = _pick(rng, TOOLS)
        data = ActionProposed(
            task_id=f"task-{s}-{i}",
            agent="assistant",
            action_index=0,
            action_count=1,
            tool=tool,
            args=_args(rng, tool),
        ).model_dump(mode="json", exclude_none=True)
        out.append(
            Event(
                id=f"ev-{i}",
                source="bench",
                type="action.proposed",
                tenant=tenants[s],
                session=f"s{s}",
                time=clocks[s],
                data=data,
            )
        )
    return out


def _contexts(gate: Any, events: list[Event], states: dict[str, dict[str, Any]]) -> list[Context]:
    return [
        Context(
            step=gate.name,
            event=e,
            state=states.setdefault(e.session, {}),
            partition=0,
            data=gate.accepts[e.type].model_validate(e.data),
        )
        for e in events
    ]


def record_requests(events: list[Event]) -> list[Request]:
    """The requests the gate makes on this stream (its ledger evolving as it decides)."""
    gate = PolicyGate(cache_size=0)
    requests: list[Request] = []
    original = gate.policy.decide

    def spy(request: Request) -> Any:
        requests.append(request)
        return original(request)

    gate.policy.decide = spy  # type: ignore[method-assign]
    states: dict[str, dict[str, Any]] = {}
    loop = asyncio.new_event_loop()
    for ctx in _contexts(gate, events, states):
        loop.run_until_complete(gate.process(ctx.event, ctx))
    loop.close()
    return requests


ROUNDS = 3


def _best_seconds(fn: Callable[[], None], rounds: int = ROUNDS) -> float:
    """The fastest of ``rounds`` runs: the machines we share are noisy, and noise only adds.

    The heap built for the benchmark (all requests up front) is frozen out of
    the garbage collector, which would otherwise rescan it over and over, a
    cost the runner (batches of 500) does not pay.
    """
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
        gc.unfreeze()
    return best


def _rate(n: int, fn: Callable[[], None]) -> float:
    return n / _best_seconds(fn)


def bench_decide(requests: list[Request], *, cache_size: int, mode: Mode) -> dict[str, Any]:
    """decide() over the requests; with a cache, each round starts from a cold one."""
    bundle = load_bundle(default_bundle_path())
    engine = compile_bundle(bundle, mode=mode)
    policies: list[LoadedPolicy] = []

    def run() -> None:
        policy = LoadedPolicy(bundle, engine, cache_size=cache_size)
        policies.append(policy)
        decide = policy.decide
        for r in requests:
            decide(r)

    rate = _rate(len(requests), run)
    result: dict[str, Any] = {"decisions_per_s": round(rate)}
    if cache_size:
        cache = policies[-1].cache
        result["cache_hit_rate"] = round(cache.hits / (cache.hits + cache.misses), 3)
        result["cache_entries"] = len(cache)
    return result


def bench_engine_only(requests: list[Request]) -> dict[str, Any]:
    policy = PolicyGate(cache_size=0).policy
    inputs = [
        orjson.dumps(policy.policy_input(r), option=orjson.OPT_SORT_KEYS).decode() for r in requests
    ]
    evaluate = policy.engine.evaluate

    def run() -> None:
        for doc in inputs:
            evaluate(doc)

    return {"decisions_per_s": round(_rate(len(inputs), run))}


BATCH_MODULE = """package sluice_batch

one(x) := {"value": v} if {
	v := data.sluice.gate.decision with input as x
} else := {"undefined": true}

results := [one(x) | some x in input]
"""


def bench_batched_interpreter(requests: list[Request], batch: int = 100) -> dict[str, Any]:
    policy = PolicyGate(cache_size=0).policy
    docs = [policy.policy_input(r) for r in requests]
    engine = regorus.Engine()
    for name, text in policy.bundle.modules:
        engine.add_policy(name, text)
    engine.add_policy("batch.rego", BATCH_MODULE)
    engine.add_data_json(policy.bundle.data_json)
    single = InterpreterEngine(policy.bundle, DECISION_RULE)
    # The batch must agree with one-at-a-time evaluation, or its speed is moot.
    engine.set_input_json(orjson.dumps(docs[:batch]).decode())
    got = orjson.loads(engine.eval_rule_as_json("data.sluice_batch.results"))
    want = [single.evaluate(orjson.dumps(d).decode()) for d in docs[:batch]]
    assert [g.get("value") for g in got] == want, "batched results differ"

    def run() -> None:
        for i in range(0, len(docs), batch):
            engine.set_input_json(orjson.dumps(docs[i : i + batch]).decode())
            orjson.loads(engine.eval_rule_as_json("data.sluice_batch.results"))

    return {"decisions_per_s": round(_rate(len(docs), run)), "batch": batch}


def bench_process(events: list[Event], make_gate: Callable[[], Any]) -> dict[str, Any]:
    """process() per event, on a fresh gate and fresh states each round.

    The Contexts (what the runner builds per event, validated data included)
    are made outside the timed loop: their cost is the runner's, not the gate's.
    """
    loop = asyncio.new_event_loop()
    best = float("inf")
    for _ in range(ROUNDS):
        gate = make_gate()
        contexts = _contexts(gate, events, {})
        process = gate.process

        async def run_all(contexts: list[Context] = contexts, process: Any = process) -> None:
            for ctx in contexts:
                await process(ctx.event, ctx)

        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        loop.run_until_complete(run_all())
        best = min(best, time.perf_counter() - started)
        gc.unfreeze()
    loop.close()
    return {
        "us_per_event": round(best / len(events) * 1e6, 1),
        "events_per_s": round(len(events) / best),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--json", dest="json_path", default=None)
    opts = parser.parse_args()

    events = workload(opts.events)
    requests = record_requests(events)
    gate = PolicyGate(cache_size=0)
    kinds: dict[str, int] = {}
    for r in requests:
        kind = gate.policy.decide(r).decision.decision
        kinds[kind] = kinds.get(kind, 0) + 1

    results: dict[str, Any] = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "events": len(events),
        "sessions": len({e.session for e in events}),
        "decision_mix": kinds,
        "uncached": bench_decide(requests, cache_size=0, mode="rvm"),
        "uncached_interpreter": bench_decide(requests, cache_size=0, mode="interpreter"),
        "engine_only": bench_engine_only(requests),
        "batched_interpreter": bench_batched_interpreter(requests),
        "cached": bench_decide(requests, cache_size=65536, mode="rvm"),
        "process": bench_process(events, PolicyGate),
        "process_uncached": bench_process(events, lambda: PolicyGate(cache_size=0)),
        "process_allow_all": bench_process(events, AllowAllGate),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if opts.json_path:
        with open(opts.json_path, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
