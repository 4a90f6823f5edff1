"""Problem responses (RFC 9457): every error the gateway answers is one JSON object.

``{"type", "title", "status", "detail"}`` with ``application/problem+json``;
``reason`` adds the machine-readable cause where there is one (the same
reason names ``sluice publish`` and the dead-letter queue use for a bad
event). Handlers raise :class:`Problem`; the app turns it into the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

import orjson
from starlette.responses import Response

from sluicegate.streams.errors import SluiceError

PROBLEM_TYPE = "application/problem+json"


class Problem(SluiceError):
    """An HTTP error with a problem body; raised by handlers, rendered by the app."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.headers = dict(headers or {})


def problem_response(
    status: int,
    detail: str,
    *,
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body: dict[str, object] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if reason is not None:
        body["reason"] = reason
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_TYPE, headers=headers
    )


def render(problem: Problem) -> Response:
    return problem_response(
        problem.status, problem.detail, reason=problem.reason, headers=problem.headers
    )
