"""``sluice`` that SIGKILLs itself after N checkpoint commits: the crash tests' worker.

``python -m tests.integration.crash_worker run ...`` with
``SLUICE_TEST_CRASH_AFTER_COMMITS=N`` is ``sluice run ...`` plus a commit hook
(``sluicegate.streams.runner.add_commit_hook``) that kills the process right
after its Nth checkpoint commit (of all its runners) lands in Postgres and
before the inputs are acked: the narrowest window of the commit protocol.
The product itself has no crash switch; only this test entry point installs one.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from sluicegate.cli import main
from sluicegate.streams.runner import add_commit_hook

CRASH_ENV = "SLUICE_TEST_CRASH_AFTER_COMMITS"


def crash_after(commits: int) -> None:
    """Install the hook: SIGKILL this process after ``commits`` checkpoint commits."""
    seen = 0

    def hook(step: str) -> None:
        nonlocal seen
        seen += 1
        if seen >= commits:
            logging.getLogger("tests.crash").warning(
                "%s: crashing on purpose after a checkpoint commit", step
            )
            os.kill(os.getpid(), signal.SIGKILL)

    add_commit_hook(hook)


if __name__ == "__main__":
    raw = os.environ.get(CRASH_ENV, "").strip()
    if raw:
        crash_after(int(raw))
    sys.exit(main(sys.argv[1:]))
