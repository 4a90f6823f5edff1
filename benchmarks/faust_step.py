"""The step benchmark's stateful step on Faust: an agent with a Table keyed by session.

``sluice bench --mode step`` runs this as a child process (its own event loop
and Faust worker) and times it from the outside, by observing its output
topic; it is the Faust baseline of DESIGN.md's budget "native Kafka runtime
>= 5 x Faust on the same step and broker". The work per event is the very
function our runtime's step calls (``sluicegate.bench.step_work``).

Written as Faust users write apps: JSON values, a ``Table`` with the
in-memory store, one agent that updates the table and sends the decision to
an output topic. Tuned as they would for a small cluster: group session and
rebalance timeouts of 10 s (the 60 s defaults stalled ~30 s in group joins
on Tansu), producer batches as large as our transport's, no web server, and
the worker started with ``--loglevel info``: at ``warn`` and above Faust's
terminal spinner sets the root logger to DEBUG, so every ``log.debug`` in
aiokafka and Faust builds a record (measured: ~9% of the worker's time, and
~1.1k against ~1.7k msg/s). A ``producer_linger`` of 5 ms measured no better.

Configured by environment (the parent sets it):
FAUST_STEP_BOOTSTRAP, FAUST_STEP_APP_ID, FAUST_STEP_INPUT, FAUST_STEP_OUTPUT,
FAUST_STEP_PARTITIONS, FAUST_STEP_DATADIR, and FAUST_STEP_SETTINGS_OUT (a file
that receives the settings used, as JSON).

    python benchmarks/faust_step.py worker --loglevel info
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import faust

from sluicegate.bench.step_work import decide, output_event

BOOTSTRAP = os.environ.get("FAUST_STEP_BOOTSTRAP", "127.0.0.1:19092")
PARTITIONS = int(os.environ.get("FAUST_STEP_PARTITIONS", "4"))

# What a Faust user would set; recorded in the benchmark's JSON.
SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 10.0,
    "broker_rebalance_timeout": 10.0,
    "broker_heartbeat_interval": 3.0,
    # The same producer batch size and acks as our KafkaTransport.
    "producer_max_batch_size": 256 * 1024,
    "producer_acks": -1,
    "store": "memory://",
    "topic_partitions": PARTITIONS,
    "topic_replication_factor": 1,
    "table_standby_replicas": 0,
    "web_enabled": False,
    "processing_guarantee": "at_least_once",
}

app = faust.App(
    os.environ.get("FAUST_STEP_APP_ID", "sluice-bench-faust"),
    broker=f"kafka://{BOOTSTRAP}",
    datadir=os.environ.get("FAUST_STEP_DATADIR", "faust-data"),
    **SETTINGS,
)

source = app.topic(
    os.environ.get("FAUST_STEP_INPUT", "bench.input"),
    key_type=bytes,
    key_serializer="raw",
    value_serializer="json",
)
sink = app.topic(
    os.environ.get("FAUST_STEP_OUTPUT", "bench.faust_out"),
    key_type=bytes,
    key_serializer="raw",
    value_serializer="json",
)
# Per-session counters, as our step keeps them in ctx.state.
sessions = app.Table("counters", default=dict, partitions=PARTITIONS)


@app.agent(source)
async def gate(stream: Any) -> None:
    async for event in stream:
        state = dict(sessions[event["session"]])
        decision = decide(state, event["tenant"], event.get("data") or {})
        sessions[event["session"]] = state
        await sink.send(key=event["session"].encode(), value=output_event(event, decision))


@app.task
async def record_settings() -> None:
    target = os.environ.get("FAUST_STEP_SETTINGS_OUT")
    if target:
        levels = {
            name: logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
            for name in ("", "faust", "faust.topics", "aiokafka")
        }
        recorded = {
            "faust_version": faust.__version__,
            "broker": BOOTSTRAP,
            **SETTINGS,
            "log_levels": levels,
        }
        await asyncio.to_thread(Path(target).write_text, json.dumps(recorded, indent=2))


if __name__ == "__main__":
    app.main()
