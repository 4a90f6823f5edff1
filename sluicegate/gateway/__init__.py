"""The HTTP gateway (``sluice serve``): upstream systems submit tasks and read results over HTTP.

``app`` holds the routes, ``ingest`` the request shapes (CloudEvents HTTP
binding, plain JSON), ``submitter`` the batching and the 429 bound, ``auth``
the API keys, ``results`` the result reads and stream, ``openapi`` the
contract, ``server`` the uvicorn wiring.
"""

from __future__ import annotations

from sluicegate.gateway.app import Gateway, create_app

__all__ = ["Gateway", "create_app"]
