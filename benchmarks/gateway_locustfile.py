"""Locust users for ``gateway_throughput.py``: submit tasks to ``sluice serve``.

Configured by environment (the driver sets it): SLUICE_BENCH_KEY (an API
key), SLUICE_BENCH_BATCH (tasks per request: 1 posts to /v1/tasks, more to
/v1/tasks:batch) and SLUICE_BENCH_USER_RATE (requests per second per user;
unset: as fast as answers come back).
"""

from __future__ import annotations

import itertools
import os

import orjson
from locust import constant, constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

KEY = os.environ.get("SLUICE_BENCH_KEY", "")
BATCH = int(os.environ.get("SLUICE_BENCH_BATCH", "1"))
RATE = os.environ.get("SLUICE_BENCH_USER_RATE")
_counter = itertools.count()


def _task() -> dict[str, object]:
    n = next(_counter)
    return {"session": f"bench-{n % 64}", "data": {"prompt": f"what is {n % 97} * 3"}}


class Submitter(FastHttpUser):  # type: ignore[misc]
    wait_time = constant_throughput(float(RATE)) if RATE else constant(0)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    @task
    def submit(self) -> None:
        if BATCH == 1:
            body = orjson.dumps(_task())
            self.client.post("/v1/tasks", data=body, headers=self.headers, name="task")
        else:
            body = orjson.dumps([_task() for _ in range(BATCH)])
            self.client.post("/v1/tasks:batch", data=body, headers=self.headers, name="batch")
