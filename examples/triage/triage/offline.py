"""A stand-in for the model when no endpoint is configured, so the demo runs offline.

It answers the classification prompt from keywords, in the same JSON a
model would give. Set ``TRIAGE_MODEL_URL`` (an OpenAI-compatible endpoint)
to use a real model instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from sluicegate import ChatResult
from sluicegate.agents.model_client import CallReport

KEYWORDS = {
    "billing": ("invoice", "charge", "refund", "payment"),
    "bug": ("error", "crash", "broken", "down"),
    "account": ("password", "login", "sign in"),
}
URGENT = ("urgent", "down", "asap", "outage")


class KeywordModel:
    """A ``ChatClient`` that classifies the last message by keywords."""

    async def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> ChatResult:
        text = str(messages[-1]["content"]).lower()
        found = [c for c, words in KEYWORDS.items() if any(w in text for w in words)]
        category = found[0] if found else "other"
        urgency = "high" if any(w in text for w in URGENT) else "low"
        answer = orjson.dumps({"category": category, "urgency": urgency}).decode()
        body = {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        return ChatResult(body, CallReport(model="keywords", usage=None, attempts=1, latency_s=0.0))
