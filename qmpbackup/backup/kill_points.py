"""Test-only: hold a run at a named point of its freeze or pause window, so a test can kill it there.

The fault tests set ``QMPBACKUP_TEST_HOLD=frozen=30`` (comma-separated ``point=seconds``)
in the environment of a ``qmpbackup backup`` they start: at each listed point the run
writes ``qmpbackup-test: at <point>`` to stderr and sleeps that long. Without the
variable (every real run) :func:`hold` returns at once. The points:

- ``recorded``: the freeze (or pause) is journaled and its guard runs; not yet issued
- ``paused``: suspend mode, the VM is paused by us
- ``frozen``: the guest is frozen; the jobs are not started
- ``snapshot``: fleecing's filters are in place (the point in time); jobs not started
- ``started``: the jobs' transaction went through; the thaw (resume) comes next
"""

from __future__ import annotations

import asyncio
import os
import sys

ENV = "QMPBACKUP_TEST_HOLD"


async def hold(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == point:
            sys.stderr.write(f"qmpbackup-test: at {point}\n")
            sys.stderr.flush()
            await asyncio.sleep(float(seconds or 0))
