from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sluicegate.agents.tools import ToolContext, ToolError, search
from sluicegate.agents.tools.search import corpus, rank, terms

CTX = ToolContext(
    now=datetime(2024, 5, 6, tzinfo=UTC), tenant="acme", session="s1", task_id="t1", agent="a"
)


def test_corpus_is_bundled_and_well_formed() -> None:
    docs = corpus()
    assert len(docs) >= 20
    assert len({d.id for d in docs}) == len(docs)
    assert all(d.title and d.text for d in docs)


def test_terms_drop_stopwords_and_plurals() -> None:
    assert terms("What are the Partitions of Kafka?") == ["partition", "kafka"]


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("hash chained audit log", "audit-chain"),
        ("how do dead letters work?", "dead-letters"),
        ("murmur2 partitioning", "partitioning"),
        ("redact email addresses", "pii-redaction"),
        ("shadow mode divergence", "shadow-mode"),
        ("JetStream durable pull consumer", "jetstream"),
        ("OpenTelemetry traceparent", "tracing"),
        ("Rego policies regorus", "rego"),
    ],
)
def test_best_hit(query: str, best: str) -> None:
    assert rank(query)[0][1].id == best


def test_ranking_is_by_score_then_id() -> None:
    hits = rank("kafka nats", limit=10)
    keys = [(-score, doc.id) for score, doc in hits]
    assert keys == sorted(keys)
    assert len(hits) > 2
    assert rank("kafka nats", limit=10) == hits


def test_no_match_gives_no_hits() -> None:
    assert rank("zebra giraffe") == []
    assert rank("the of and") == []


async def test_tool_output() -> None:
    out = await search.run({"query": "audit chain", "limit": 2}, CTX)
    assert out["query"] == "audit chain"
    assert out["hits"][0]["id"] == "audit-chain"
    assert len(out["hits"]) == 2
    assert out["summary"].startswith("Hash-chained audit log: ")
    assert all(len(h["snippet"]) <= 160 for h in out["hits"])
    empty = await search.run({"query": "zebra"}, CTX)
    assert empty["hits"] == []
    assert "no documents match" in empty["summary"]


@pytest.mark.parametrize(
    "args", [{}, {"query": ""}, {"query": "x", "limit": 0}, {"query": "x", "limit": True}]
)
async def test_tool_rejects_bad_arguments(args: dict[str, object]) -> None:
    with pytest.raises(ToolError):
        await search.run(args, CTX)
