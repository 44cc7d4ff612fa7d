"""An export and the narrow interface the server needs from whoever takes its data.

The server declares :class:`ExportConsumer` (the consumer declares the interface it needs, the
server is that consumer of the data path): four coroutines, called strictly in the order the
requests arrived on a connection, one at a time per connection. The server replies to a request
only after its call returned, so a slow consumer slows QEMU down instead of filling our memory,
and a FLUSH is acknowledged only after :meth:`ExportConsumer.flush` finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


@dataclass(frozen=True, slots=True)
class Export:
    """One writable export: its name on the wire, its exact size in bytes, and its consumer."""

    name: str
    size: int
    consumer: ExportConsumer

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 4096:
            raise ValueError(f"bad NBD export name {self.name!r}")
        if self.size < 0:
            raise ValueError(f"bad NBD export size {self.size}")
