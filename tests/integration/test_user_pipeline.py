"""A user's pipeline, written in a folder outside the repository, run by ``sluice run --pipeline``.

The module lives in a temporary directory, which is the workers' current
directory; nothing installs it. ``sluice run`` and ``sluice publish`` are the
console script (not ``python -m``, which would put the current directory on
``sys.path`` by itself), so the module is found because ``--pipeline``
imports from the current directory. On NATS and on Kafka (Tansu), with real
Postgres: upstream lines validated against the step's model by ``sluice
publish``, keyed state per session, ``DeadLetter`` and one result per input.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sluicegate.settings import TransportName
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    env_for,
    prepare_database,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

APP = """
from pydantic import BaseModel

from sluicegate import Context, DeadLetter, Event, Output, Pipeline, Step


class Word(BaseModel):
    word: str


class Tally(Step[Word]):
    name = "tally"
    inputs = ("words",)
    outputs = ("tallies",)
    types = ("word.seen",)

    async def process(self, event: Event, ctx: Context[Word]) -> list[Output]:
        if ctx.data.word == "poison":
            raise DeadLetter("poison_word", "no poison, please")
        ctx.state["count"] = count = ctx.state.get("count", 0) + 1
        ctx.state["last"] = ctx.data.word
        ctx.result(event.id, "counted", {"word": ctx.data.word, "count": count})
        return [ctx.output("tallies", "word.tallied", {"count": count})]


pipeline = Pipeline([Tally()], name="wordcount")
"""

SESSIONS = ("s0", "s1", "s2")
WORDS = [f"w{i}" for i in range(12)]


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_a_pipeline_outside_the_repository_runs_with_sluice_run_pipeline(
    kind: TransportName, nats_url: str, kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    module = f"wordcount_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(APP)
    spec = f"{module}:pipeline"
    settings = settings_for(
        kind,
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
        partitions=3,
    )
    env = {**_base_env(), **env_for(settings)}
    sluice = str(Path(sys.executable).parent / "sluice")
    await prepare_database(settings)
    log = tmp_path / "worker.log"
    try:
        with log.open("wb") as sink:
            worker = subprocess.Popen(
                [sluice, "run", "--pipeline", spec, "--log-level", "WARNING"],
                cwd=tmp_path,
                env=env,
                stdout=sink,
                stderr=sink,
            )
        try:
            lines = [
                {"tenant": "acme", "session": SESSIONS[i % 3], "data": {"word": word}}
                for i, word in enumerate(WORDS)
            ]
            lines.insert(5, {"tenant": "acme", "session": "s0", "data": {"word": "poison"}})
            lines.insert(7, {"tenant": "acme", "session": "s1", "data": {"wrod": "typo"}})
            published = await asyncio.to_thread(
                subprocess.run,
                [sluice, "publish", "--pipeline", spec, "-"],
                cwd=tmp_path,
                env=env,
                input="\n".join(json.dumps(line) for line in lines).encode(),
                capture_output=True,
                timeout=120,
                check=False,
            )
            report = published.stderr.decode()
            # The line that does not fit Word is refused before it reaches the broker.
            assert published.returncode == 1, report
            assert "line 8: invalid_data" in report and "published 13, rejected 1" in report, report

            reached = await wait_for_results(settings, len(WORDS), timeout_s=120)
            assert reached == len(WORDS), log.read_text(errors="replace")[-3000:]
        finally:
            worker.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(worker.wait, 60)
        assert code == 0, log.read_text(errors="replace")[-3000:]

        results = await all_results(settings)
        assert {r.status for r in results} == {"counted"}
        assert sorted(r.answer["word"] for r in results) == sorted(WORDS)
        # Keyed state: each session counted its own four words, in order.
        states = await scalar_rows(settings, "SELECT session, state FROM step_state")
        assert dict(states) == {
            s: {"count": 4, "last": WORDS[9 + n]} for n, s in enumerate(SESSIONS)
        }
        letters = await scalar_rows(
            settings, "SELECT step, reasons FROM audit_log WHERE kind = 'dead_letter'"
        )
        assert letters == [("tally", ["poison_word"])]
    finally:
        await drop_schema(settings)


def _base_env() -> dict[str, str]:
    # Not the repository: the worker must find the module through --pipeline alone.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLUICE_PIPELINE")}
