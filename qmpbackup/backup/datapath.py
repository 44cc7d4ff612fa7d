"""Our end of the data path: NBD exports → cluster assemblers → VMA writer → compressor → file.

QEMU's backup jobs write each drive into its own export on our NBD endpoint;
every export feeds a :class:`ClusterAssembler`, and all of them feed one
:class:`VmaWriter`, whose bytes go through the compressor into the ``.dat``
file. Nothing here knows about QMP.

Durability: the archive is complete only when every export has been flushed
and disconnected (QEMU sends FLUSH and DISC when its target node is deleted),
every assembler has emitted its last clusters, the writer and the compressor
are closed, and the file is fsynced and renamed (:mod:`qmpbackup.atomic_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from uuid import UUID

from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.compress import Compression, CompressOptions, open_compressor
from qmpbackup.errors import QmpBackupError
from qmpbackup.nbd.export import Export, ExportConsumer
from qmpbackup.nbd.server import NbdServer
from qmpbackup.vma import VmaWriter
from qmpbackup.vma.index import embed_index, write_sidecar

log = logging.getLogger(__name__)

#: How long QEMU may take to flush and disconnect a deleted target node.
DISCONNECT_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device of the archive: its drive key, VMA name, size in bytes and NBD export name."""

    key: str
    devname: str
    size: int
    export: str


#: Wraps a device's export consumer (a feature of the run, e.g. fleecing's space reclaim, watches what arrives).
ConsumerWrap = Callable[[DeviceSpec, ExportConsumer], ExportConsumer]


@dataclass(frozen=True, slots=True)
class DataStats:
    received: int  # bytes QEMU sent (data and zero ranges)
    zero: int  # bytes that were zero (write-zeroes or all-zero data)
    written: int  # bytes of archive before compression


class ArchiveDataPath:
    """One archive's receiving side. Use :meth:`open`, serve, then :meth:`finish` or :meth:`abort`."""

    def __init__(self, out: BinaryIO, compression: Compression, options: CompressOptions,
                 configs: Sequence[tuple[str, bytes]], devices: Sequence[DeviceSpec],
                 socket: Path, name: str, *, archive_uuid: UUID | None = None,
                 wrap: ConsumerWrap | None = None) -> None:
        self._compressor = open_compressor(out, compression, options)
        self.writer = VmaWriter(self._compressor, uuid=archive_uuid)
        for config_name, data in configs:
            self.writer.add_config(config_name, data)
        self.assemblers: dict[str, ClusterAssembler] = {}
        exports = []
        for dev in devices:
            dev_id = self.writer.add_device(dev.devname, dev.size)
            assembler = ClusterAssembler(self.writer, dev_id, dev.size, name=dev.devname)
            self.assemblers[dev.export] = assembler
            consumer: ExportConsumer = assembler if wrap is None else wrap(dev, assembler)
            exports.append(Export(dev.export, dev.size, consumer))
        self.server = NbdServer(socket, exports, name=f"nbd-{name}")
        self._index_embedded = False

    @property
    def uuid(self) -> str:
        return str(self.writer.uuid)

    def stats(self) -> DataStats:
        received = sum(a.stats.bytes_received for a in self.assemblers.values())
        zero = sum(a.stats.zero_bytes for a in self.assemblers.values())
        return DataStats(received=received, zero=zero, written=self.writer.bytes_written)

    async def finish(self) -> None:
        """After QEMU deleted its target nodes: wait for the disconnects, emit the rest, close."""
        for export in self.assemblers:
            await self.server.wait_disconnected(export, DISCONNECT_TIMEOUT_S)
        self.server.check()
        await self.server.close()
        for assembler in self.assemblers.values():
            assembler.finish()
        self.writer.close()
        assert self.writer.index is not None
        self._index_embedded = embed_index(self.writer.index, self._compressor, self.writer.bytes_written)
        self._compressor.close()

    def publish_index(self, archive: Path | None) -> None:
        """After the archive got its final name: its sidecar index unless it carries one (framed zstd).

        A sidecar that cannot be written costs only the index, so it is a warning, not a failure.
        """
        index = self.writer.index
        if index is None:
            return
        try:
            if not self._index_embedded and archive is not None:
                write_sidecar(index, archive, self.writer.bytes_written)
        except (OSError, QmpBackupError) as exc:
            log.warning("could not write the index of %s: %s", archive, exc)
        finally:
            index.close()

    async def abort(self) -> None:
        """Stop serving and kill the compressor; the caller removes the file."""
        try:
            await self.server.close()
        finally:
            self._compressor.abort()
            if self.writer.index is not None:
                self.writer.index.close()
