"""Test-only: hold a run at a named point, so a test can kill it there.

The fault tests set ``QMPBACKUP_TEST_HOLD=frozen=30`` (comma-separated ``point=seconds``)
in the environment of a ``qmpbackup backup`` they start: at each listed point the run
writes ``qmpbackup-test: at <point>`` to stderr and sleeps that long. Without the
variable (every real run) :func:`hold` returns at once. The points:

- ``copied``: stop mode, the instant copies of the disks exist (journaled), the VM runs again
- ``stopped``: stop mode without instant copy, the VM is shut down by us (journaled) and the
  QEMU we spawned has its own disks open; the VM is started again only after the backup
- ``journal``: the journal is open (an earlier run's leftovers undone); nothing new exists yet
  (in stop mode only the instant copies)
- ``prepared``: fleecing's images, nodes and filters exist; the devices do not use them yet
- ``attached``: our NBD endpoint listens, the partial archive exists, QEMU's target nodes are attached
- ``recorded``: the freeze (or pause) is journaled and its guard runs; not yet issued
- ``paused``: suspend mode, the VM is paused by us
- ``frozen``: the guest is frozen; the jobs are not started
- ``snapshot``: fleecing's filters are in place (the point in time); jobs not started
- ``started``: the jobs' transaction went through; the thaw (resume) comes next
- ``running``: the window is closed, the jobs run (our endpoint keeps receiving while held)
- ``detached``: the jobs are done and their target nodes deleted; the archive is not closed
- ``finished``: the archive is complete under its temporary name (``….dat``)
- ``published``: the archive has its final name; bitmaps and fleecing are not yet cleaned up
- ``teardown``: fleecing's graph is about to be torn down
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
