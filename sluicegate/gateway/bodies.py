"""Reading a request body within a limit: 413 before a large body is read, not after."""

from __future__ import annotations

from starlette.requests import Request

from sluicegate.gateway.problems import Problem


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    return bytes(body)


def _too_large(size: int, limit: int) -> Problem:
    return Problem(
        413, f"the body is {size} bytes, over the {limit}-byte limit", reason="too_large"
    )
