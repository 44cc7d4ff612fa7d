"""Giving fleecing space back while the backup runs.

QEMU >= 9.1: the backup job does it (``discard-source: true``, :func:`job_extra`); its
cluster must be at least the fleecing image's cluster (``x-perf.min-cluster-size``,
QEMU >= 9.2), otherwise the discards do not free whole clusters.

Older QEMU (7.2): a second ``snapshot-access`` node on the same filter, exported through
QEMU's own NBD server on a private socket, and TRIMs there for what our endpoint has
already received. TRIMs on the node the job reads are silently lost,
hence the second node. Every TRIM is aligned to ``max(64 KiB, fleecing cluster, the
filter's copy-bitmap granularity)``; only the last one may end at the disk's end: an
unaligned TRIM aborts QEMU 7.2 (pitfall 1). :class:`TrimReclaimer.received` is called
with each range the endpoint got; :class:`ReclaimingConsumer` wraps an export consumer
to do exactly that.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from fleecing.errors import FleecingError
from fleecing.graph import DriveFleecing, delete_export, stop_nbd_server
from qmpbackup.nbd.client import NbdClient, NbdClientError
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu import naming
from qmpbackup.qemu.capabilities import Capabilities
from qmpbackup.qemu.errors import QmpCommandError
from qmpbackup.qemu.nodes import add_node, delete_node
from qmpbackup.qemu.session import QmpSession
from qmpbackup.recovery import kinds
from qmpbackup.recovery.journal import Entry, Journal

log = logging.getLogger(__name__)

BLOCK = 64 << 10  # the backup job's smallest unit
MAX_TRIM = 32 << 20
#: Wake the TRIM task once this much is ready (a 64 KiB unit each: TRIM soon, while it is cheap).
WAKE_BYTES = 64 << 10


def job_extra(caps: Capabilities, cluster_size: int) -> dict[str, Any]:
    """Extra ``blockdev-backup`` arguments that make the job discard what it copied."""
    extra: dict[str, Any] = {}
    if caps.has_backup_discard_source:
        extra["discard-source"] = True
        if caps.has_backup_min_cluster_size and cluster_size > BLOCK:
            extra["x-perf"] = {"min-cluster-size": cluster_size}
    return extra


def needs_trim_path(caps: Capabilities) -> bool:
    """True where only the NBD TRIM path can reclaim (no ``discard-source``)."""
    return not caps.has_backup_discard_source and caps.has_nbd_server_start and caps.has_block_export_add


async def copy_granularity(session: QmpSession, node: str) -> int:
    """The largest unnamed dirty bitmap granularity on ``node`` (the filter's copy bitmap)."""
    best = 0
    for n in await session.execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == node:
            for bm in n.get("dirty-bitmaps") or ():
                if "name" not in bm:
                    best = max(best, int(bm.get("granularity", 0)))
    return best


class QemuNbdServer:
    """QEMU's own NBD server for one VM, on a private socket; started once for all drives."""

    def __init__(self, session: QmpSession, journal: Journal, socket: Path) -> None:
        self.session, self.journal, self.socket = session, journal, socket
        self._entry: Entry | None = None

    async def start(self) -> None:
        self._entry = self.journal.record(kinds.NBD_SERVER, socket=str(self.socket))
        try:
            await self.session.execute("nbd-server-start",
                                       {"addr": {"type": "unix", "data": {"path": str(self.socket)}}})
        except QmpCommandError as exc:
            self.journal.resolve(self._entry)  # not ours (already running) or not started
            self._entry = None
            raise FleecingError(f"cannot start QEMU's NBD server for space reclaim: {exc.desc}") from exc

    async def stop(self) -> None:
        if self._entry is not None:
            await stop_nbd_server(self.session)
            self.journal.resolve(self._entry)
            self._entry = None


class TrimClient(Protocol):
    """Where the TRIMs go: the :class:`~qmpbackup.nbd.client.NbdClient` of the trim export."""

    async def trim(self, offset: int, length: int) -> None: ...

    async def close(self) -> None: ...


class ReclaimState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DISABLED = "disabled"  # a TRIM failed: keep backing up, stop reclaiming
    CLOSED = "closed"


class TrimReclaimer:
    """TRIMs what the backup already read, on a second snapshot-access node (QEMU without discard-source)."""

    def __init__(self, graph: DriveFleecing, server: QemuNbdServer) -> None:
        self.graph = graph
        self.server = server
        self.session, self.journal = graph.session, graph.journal
        self.size = graph.disk.size
        self.node = graph.names.snaptrim
        self.export_id = naming.export_name(graph.vmid, graph.disk.key, naming.ROLE_EXPORT, "trim")
        self.alignment = 0
        self.trimmed_bytes = 0
        self._client: TrimClient | None = None
        self._entries: list[Entry] = []
        self._done = bytearray((self.size + BLOCK - 1) // BLOCK)
        self._unit_done: list[int] = []
        self._ready: set[int] = set()
        self._state = ReclaimState.NEW
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<TrimReclaimer {self.export_id} {self._state.value}>"

    @property
    def state(self) -> ReclaimState:
        return self._state

    async def start(self) -> None:
        """Second snapshot node, its export, our client. Call after the graph's insert()."""
        g = self.graph
        self.alignment = max(BLOCK, g.image.cluster_size, await copy_granularity(self.session, g.disk.top_node))
        self.set_alignment(self.alignment)
        await add_node(self.session, self.journal, {"driver": "snapshot-access", "node-name": self.node,
                                                    "file": g.names.cbw, "discard": "unmap"},
                       error=FleecingError, recorded=self._entries.append, refused=self._entries.remove)
        self._entries.append(self.journal.record(kinds.BLOCK_EXPORT, id=self.export_id))
        await self.session.execute("block-export-add", {"type": "nbd", "id": self.export_id,
                                                        "node-name": self.node, "name": self.export_id,
                                                        "writable": True})
        client = self._client = await NbdClient.connect(str(self.server.socket), self.export_id)
        if client.size != self.size:
            raise FleecingError(f"trim export {self.export_id} has size {client.size}, expected {self.size}")
        self.trim_through(client)
        self.start_trimming()
        log.debug("%r: TRIM alignment %d", self, self.alignment)

    def trim_through(self, client: TrimClient) -> None:
        """Reclaim from now on, with TRIMs to ``client`` (:meth:`close` closes it).

        :meth:`start` calls it once the trim export is connected; the tests of the alignment
        rules give a client that records the TRIMs, with no QEMU behind it.
        """
        self._client = client
        self._state = ReclaimState.RUNNING

    def start_trimming(self) -> None:
        """Start the task that sends TRIMs (owned here; :meth:`close` ends it)."""
        if self._task is None:
            name = f"trim-vm{self.graph.vmid}-{self.graph.disk.key}"
            self._task = asyncio.create_task(self._trim_loop(), name=name)

    async def _trim_loop(self) -> None:
        """TRIMs run beside the data path: our endpoint never waits for them, and what piles up
        while one is in flight is merged into the next (few large TRIMs when the backup is fast)."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    def set_alignment(self, alignment: int) -> None:
        """The TRIM unit; must be a multiple of 64 KiB (the job's and our bookkeeping's block)."""
        if alignment <= 0 or alignment % BLOCK:
            raise FleecingError(f"fleecing cluster {alignment} is not a multiple of 64 KiB")
        self.alignment = alignment
        self._unit_done = [0] * ((self.size + alignment - 1) // alignment)

    def _blocks_per_unit(self, unit: int) -> int:
        per = self.alignment // BLOCK
        start = unit * per
        return min(per, len(self._done) - start)

    def _mark(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        first = (offset + BLOCK - 1) // BLOCK  # only blocks the range covers completely
        last = end // BLOCK if end < self.size else len(self._done)  # the tail block may be short
        per = self.alignment // BLOCK
        for b in range(first, last):
            if not self._done[b]:
                self._done[b] = 1
                u = b // per
                self._unit_done[u] += 1
                if self._unit_done[u] == self._blocks_per_unit(u):
                    self._ready.add(u)

    def _runs(self) -> Iterator[tuple[int, int]]:
        """Ready units as aligned (offset, length) TRIMs, merged, at most MAX_TRIM each."""
        units = sorted(self._ready)
        self._ready.clear()
        per_trim = max(1, MAX_TRIM // self.alignment)
        i = 0
        while i < len(units):
            j = i
            while j + 1 < len(units) and units[j + 1] == units[j] + 1 and j + 1 - i < per_trim:
                j += 1
            offset = units[i] * self.alignment
            length = min((j - i + 1) * self.alignment, self.size - offset)
            yield offset, length
            i = j + 1

    def _check_aligned(self, offset: int, length: int) -> None:
        if offset % self.alignment or (length % self.alignment and offset + length != self.size):
            raise FleecingError(f"refusing unaligned TRIM {offset}+{length} (alignment {self.alignment})")

    async def received(self, offset: int, length: int) -> None:
        """Our endpoint has the range: the whole aligned units it completes get trimmed (soon)."""
        if self._state is not ReclaimState.RUNNING:
            return
        self._mark(offset, length)
        if len(self._ready) * self.alignment >= max(WAKE_BYTES, self.alignment):
            self._wakeup.set()

    async def flush(self) -> None:
        """Send the TRIMs of every unit completed so far. A failure stops reclaiming, not the backup."""
        if self._state is not ReclaimState.RUNNING or self._client is None:
            self._ready.clear()
            return
        for offset, length in self._runs():
            try:
                self._check_aligned(offset, length)
                await self._client.trim(offset, length)
            except (NbdClientError, FleecingError) as exc:
                log.warning("space reclaim on %s stopped: %s", self.export_id, exc)
                self.error = exc
                self._state = ReclaimState.DISABLED
                self._ready.clear()
                return
            self.trimmed_bytes += length

    async def close(self) -> None:
        """Last TRIMs, disconnect, remove export and node (before the graph's teardown); safe twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._state is ReclaimState.RUNNING:
            await self.flush()
        if self._client is not None:
            await self._client.close()
            self._client = None
        for entry in reversed(list(self._entries)):
            if entry.kind == kinds.BLOCK_EXPORT.name:
                await delete_export(self.session, str(entry.data["id"]))
            else:
                await delete_node(self.session, str(entry.data["node"]))
            self.journal.resolve(entry)
            self._entries.remove(entry)
        self._state = ReclaimState.CLOSED


class RangeListener(Protocol):
    """What :class:`ReclaimingConsumer` tells about each range that arrived."""

    async def received(self, offset: int, length: int) -> None: ...


class ReclaimingConsumer:
    """An export consumer that passes everything on, then tells the reclaimer what arrived.

    ``reclaimer`` is looked up per request (a callable), so the consumer can be built
    before the graph exists and does nothing where no TRIM path runs.
    """

    def __init__(self, inner: ExportConsumer, reclaimer: Callable[[], RangeListener | None]) -> None:
        self.inner = inner
        self._reclaimer = reclaimer

    async def write(self, offset: int, data: memoryview, /) -> None:
        length = len(data)
        await self.inner.write(offset, data)
        r = self._reclaimer()
        if r is not None:
            await r.received(offset, length)

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        await self.inner.write_zeroes(offset, length)
        r = self._reclaimer()
        if r is not None:
            await r.received(offset, length)

    async def trim(self, offset: int, length: int, /) -> None:
        await self.inner.trim(offset, length)

    async def flush(self) -> None:
        await self.inner.flush()
