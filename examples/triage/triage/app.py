"""The triage pipeline: ``sluice run --pipeline triage.app:pipeline`` (from examples/triage).

``pipeline()`` reads the model endpoint from the environment when the
worker starts: ``TRIAGE_MODEL_URL`` (an OpenAI-compatible endpoint, with
``TRIAGE_MODEL_KEY`` and ``TRIAGE_MODEL``); without it, an offline keyword
stand-in answers instead. The policy gate decides on every action with the
rules in ``policy/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from sluicegate import ChatClient, ModelClient, Pipeline
from sluicegate.policy.gate import PolicyGate
from triage.models import TICKETS
from triage.offline import KeywordModel
from triage.steps import Act, Classify

POLICY = Path(__file__).parent / "policy"

# What `sluice demo --pipeline triage.app:pipeline` publishes (tenant and
# session are required; the type defaults to ticket.opened).
SAMPLES = [
    {"tenant": "acme", "session": "c-1", "data": {"subject": "Charged twice", "body": "Refund?"}},
    {"tenant": "acme", "session": "c-2", "data": {"subject": "Forgot my password"}},
    {"tenant": "acme", "session": "c-3", "data": {"subject": "Site down", "body": "Outage!"}},
    {"tenant": "acme", "session": "c-4", "data": {"subject": "URGENT: password reset"}},
    {"tenant": "acme", "session": "c-5", "data": {"subject": "Hello", "body": "A question"}},
    {"tenant": "acme", "session": "c-5", "data": {"subject": "Hello again"}},
    {"tenant": "acme", "session": "c-5", "data": {"subject": "Anyone?"}},
]


def pipeline(model: ChatClient | None = None) -> Pipeline:
    """The triage pipeline; ``model`` replaces the configured one (tests pass a stub)."""
    if model is None:
        model = _configured_model()
    return Pipeline(
        [
            Classify(model, model_name=os.environ.get("TRIAGE_MODEL", "gpt-4o-mini")),
            PolicyGate(POLICY),
            Act(),
        ],
        samples={TICKETS: SAMPLES},
        name="triage",
    )


def _configured_model() -> ChatClient:
    url = os.environ.get("TRIAGE_MODEL_URL", "").strip()
    if not url:
        return KeywordModel()
    return ModelClient(url, api_key=os.environ.get("TRIAGE_MODEL_KEY"), step="classify")
