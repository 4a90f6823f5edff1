"""SIGTERM always ends a worker: at the end of the grace period, or at a second signal,
whatever the worker waits on; and at once during start-up (issue 21)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from sluicegate.runtime import FORCED_EXIT_CODE, _unless_stopped

# A process stuck the way an outage can leave a worker: it sets up the
# signals as `sluice run` does, then waits on something that never ends and
# never looks at ``stop``.
STUCK = """
import asyncio, sys
from sluicegate.runtime import stop_on_signals

async def main():
    stop = asyncio.Event()
    stop_on_signals(stop, grace=float(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def stuck_worker(grace: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def test_the_end_of_the_grace_period_ends_a_stuck_worker() -> None:
    proc = stuck_worker(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(20)
    assert code == FORCED_EXIT_CODE
    err = proc.stderr.read() if proc.stderr else ""
    assert "still running 0.5s after SIGTERM: exiting now" in err, err


def test_a_second_sigterm_ends_a_stuck_worker_at_once() -> None:
    proc = stuck_worker(600)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert proc.poll() is None, "one SIGTERM drains first"
    proc.send_signal(signal.SIGTERM)
    # Bounded by the test, not by the 600 s grace.
    assert proc.wait(20) == FORCED_EXIT_CODE
    err = proc.stderr.read() if proc.stderr else ""
    assert "a second SIGTERM: exiting now" in err, err


async def test_stop_during_start_up_cancels_it() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()  # a connect that never answers
        finally:
            cancelled.set()

    started = asyncio.create_task(_unless_stopped(stop, hangs()))
    await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(5):
        assert await started is False
    assert cancelled.is_set()


async def test_start_up_errors_are_raised_and_success_is_true() -> None:
    async def fine() -> None:
        return None

    async def fails() -> None:
        raise TimeoutError("Postgres did not answer")

    assert await _unless_stopped(asyncio.Event(), fine()) is True
    try:
        await _unless_stopped(asyncio.Event(), fails())
    except TimeoutError as exc:
        assert "did not answer" in str(exc)
    else:
        raise AssertionError("the start-up error was swallowed")
