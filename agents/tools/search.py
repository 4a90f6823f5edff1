"""The ``search`` tool: keyword search over a small bundled corpus.

The corpus (``agents/data/corpus.json``) is a few short documents about the
project's own domain, so the reference pipeline answers questions without a
network. Scoring is plain keyword counting: a query term found in a title is
worth 3, in a tag 2, in the text 1 per occurrence. Ties break on document id,
so the ranking is deterministic.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sluicegate.agents.tools.base import JSON, ToolContext, ToolError, string_arg

CORPUS = "data/corpus.json"
MAX_QUERY_CHARS = 500
DEFAULT_LIMIT = 3
MAX_LIMIT = 10
SNIPPET_CHARS = 160

_WORD = re.compile(r"[a-z0-9]+")
# Words too common to say anything about a document.
_STOPWORDS = frozenset(
    # One string reads better than forty quoted words.
    "a an and are as at be by can do does for from how i in is it its me of on or "  # noqa: SIM905
    "search find look up the that this to what when where which who why with you".split()
)


def terms(text: str) -> list[str]:
    """Lower-cased words, stopwords removed, a plural ``s`` stripped (a crude stemmer)."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in _STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    title: str
    text: str
    tags: tuple[str, ...]


def _corpus_text() -> str:
    try:
        return resources.files("sluicegate.agents").joinpath(CORPUS).read_text("utf-8")
    except NotADirectoryError:
        # An editable install made while ``agents`` had no ``__init__`` presents
        # it as a namespace package, whose placeholder path entry
        # importlib.resources refuses; the file is still next to this module.
        return (Path(__file__).resolve().parents[1] / CORPUS).read_text("utf-8")


@functools.cache
def corpus() -> tuple[Document, ...]:
    """The bundled documents, loaded once from the package data."""
    raw = json.loads(_corpus_text())
    return tuple(
        Document(id=d["id"], title=d["title"], text=d["text"], tags=tuple(d.get("tags", ())))
        for d in raw["documents"]
    )


def score(query_terms: list[str], doc: Document) -> int:
    title = terms(doc.title)
    tags = terms(" ".join(doc.tags))
    text = terms(doc.text)
    total = 0
    for term in set(query_terms):
        total += 3 * title.count(term) + 2 * tags.count(term) + text.count(term)
    return total


def rank(query: str, limit: int = DEFAULT_LIMIT) -> list[tuple[int, Document]]:
    """The best ``limit`` documents with a positive score, best first, ties by id."""
    wanted = terms(query)
    scored = [(score(wanted, doc), doc) for doc in corpus()]
    hits = [(s, d) for s, d in scored if s > 0]
    hits.sort(key=lambda hit: (-hit[0], hit[1].id))
    return hits[:limit]


def _snippet(text: str) -> str:
    if len(text) <= SNIPPET_CHARS:
        return text
    return text[: SNIPPET_CHARS - 1].rsplit(" ", 1)[0] + "…"


async def run(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
    query = string_arg(args, "query", max_chars=MAX_QUERY_CHARS)
    limit = args.get("limit", DEFAULT_LIMIT)
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise ToolError(f"argument 'limit' must be an integer from 1 to {MAX_LIMIT}")
    hits = rank(query, limit)
    if hits:
        best = hits[0][1]
        summary = f"{best.title}: {_snippet(best.text)}"
    else:
        summary = f"no documents match {query!r}"
    return {
        "query": query,
        "hits": [
            {"id": d.id, "title": d.title, "score": s, "snippet": _snippet(d.text)} for s, d in hits
        ],
        "summary": summary,
    }
