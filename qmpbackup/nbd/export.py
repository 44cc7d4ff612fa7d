"""An export and the narrow interfaces the server needs from whoever takes or gives its data.

The server declares both sides (the consumer declares the interface it needs; the server is
the consumer of the data path):

* :class:`ExportConsumer` takes what a backup job writes: four coroutines, called strictly in
  the order the requests arrived on a connection, one at a time per connection. The server
  replies to a request only after its call returned, so a slow consumer slows QEMU down
  instead of filling our memory, and a FLUSH is acknowledged only after
  :meth:`ExportConsumer.flush` finished.
* :class:`ExportSource` gives what a read-only export serves (``qmpbackup export``): blocking
  calls, run in worker threads so that the event loop stays responsive; several may run at
  once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Piece = bytes | bytearray | memoryview


class ExportConsumer(Protocol):
    """Receives what NBD clients write into one export.

    ``data`` of :meth:`write` is a view into the connection's receive buffer: it is valid only
    until the call returns (copy what must outlive the call). Ranges are within the export
    (the server answers out-of-range requests itself). An exception fails the request with EIO
    and is recorded as the server's failure.
    """

    async def write(self, offset: int, data: memoryview, /) -> None: ...

    async def write_zeroes(self, offset: int, length: int, /) -> None: ...

    async def trim(self, offset: int, length: int, /) -> None: ...

    async def flush(self) -> None: ...


class ExportSource(Protocol):
    """Gives the contents of one read-only export (an archive's device, a raw file in tests).

    Both calls are blocking and thread-safe; ranges are within ``size`` (the server answers
    out-of-range requests itself). An exception fails that one request with EIO and is logged;
    the export goes on serving.
    """

    @property
    def size(self) -> int: ...

    def pieces(self, offset: int, length: int, /) -> Sequence[Piece]:
        """Exactly ``length`` bytes at ``offset``, as buffers in order (sent as they are, by one
        scatter-gather write: a source need not join what it has in pieces)."""
        ...

    def allocation(self, offset: int, length: int, max_runs: int = ..., /) -> list[tuple[int, int, bool]]:
        """``(offset, length, reads_as_zeroes)`` runs covering the range, in order.

        Runs may start before or end after the range (block granularity); the server clips them.
        A source may stop early, after ``max_runs`` runs or sooner (runs covering only the start
        of the range, at least one): BLOCK_STATUS then answers for less than asked, which NBD allows.
        """
        ...


@dataclass(frozen=True, slots=True)
class Export:
    """One export: its name on the wire, its exact size in bytes, and either a consumer
    (writable, for a backup job) or a source (read-only)."""

    name: str
    size: int
    consumer: ExportConsumer | None = None
    source: ExportSource | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 4096:
            raise ValueError(f"bad NBD export name {self.name!r}")
        if self.size < 0:
            raise ValueError(f"bad NBD export size {self.size}")
        if (self.consumer is None) == (self.source is None):
            raise ValueError(f"NBD export {self.name!r} needs either a consumer or a source")

    @classmethod
    def read_only(cls, name: str, source: ExportSource) -> Export:
        return cls(name, source.size, source=source)

    @property
    def writable(self) -> bool:
        return self.consumer is not None
