"""A property-based run of the gateway's OpenAPI document (schemathesis): no server error.

Schemathesis reads /openapi.json from a running gateway and sends requests
generated from it, valid and invalid, to every operation but the endless
results stream (tested in test_gateway). Each answer must not be a 5xx and
must match the document: status codes, content types and bodies.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from sluicegate.settings import Settings
from tests.integration.gateway_support import in_thread, new_key, served
from tests.integration.pipeline_support import prepare_database, settings_for
from tests.services import new_prefix


@pytest.fixture(scope="module")
def gateway(nats_url: str, database_url: str) -> Iterator[tuple[str, str]]:
    config: Settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap="127.0.0.1:1",
        database_url=database_url,
        prefix=new_prefix(),
    ).model_copy(update={"gateway_max_wait": 0.2, "gateway_max_batch": 3})
    in_thread(lambda: prepare_database(config))
    key = new_key(config, "acme")
    with served(config) as url:
        yield url, key


# Driven by hand rather than through schemathesis's pytest plugin, which
# does not run under the pytest this project uses (9.x).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api(gateway: tuple[str, str], mode: GenerationMode) -> None:
    url, key = gateway
    api = schemathesis.openapi.from_url(f"{url}/openapi.json").exclude(path="/v1/results/stream")
    headers = {"Authorization": f"Bearer {key}"}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 5  # every path but the stream (and, maybe, the document itself)

    for operation in operations:

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,  # the same cases on every run: a failure is reproducible
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=url,
                headers=headers,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        try:
            check()
        except Unsatisfiable:
            # Nothing to get wrong in a call without parameters or body.
            assert mode is GenerationMode.NEGATIVE and operation.path == "/healthz"
