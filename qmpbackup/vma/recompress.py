"""``vma recompress``: any archive into qmpbackup's framed zstd with an index, for random access.

A gzip or lzo archive, or zstd written as one long stream (the ``zstd`` command, Proxmox),
can only be read front to back. This reads it once, with every check of the reader, and
writes the same VMA content again: same uuid and ctime (a dirty-bitmap chain named after the
archive still fits), same configs and devices, each extent with the same clusters and stored
blocks, cut into independent zstd frames of at most 16 clusters, and the index at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qmpbackup.atomic_file import OutputExistsError, atomic_output
from qmpbackup.compress import Compression, CompressOptions, open_compressor
from qmpbackup.errors import UsageError
from qmpbackup.vma import format as fmt
from qmpbackup.vma.archive_io import open_archive
from qmpbackup.vma.create import temp_path
from qmpbackup.vma.errors import VmaError
from qmpbackup.vma.index import embed_index
from qmpbackup.vma.reader import Extent, VmaReader
from qmpbackup.vma.writer import FRAME_SLOTS, ReusedPart, VmaWriter

log = logging.getLogger(__name__)


def recompress_archive(source: str, dest: Path, zstd_threads: int = 1) -> VmaWriter:
    """Write ``source`` (any compression, ``-`` = stdin) as a new framed ``.vma.zst`` ``dest`` with its index."""
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"archive {dest} already exists")
    options = CompressOptions(zstd_threads=zstd_threads)
    try:
        with open_archive(source) as src:
            reader = VmaReader(src)
            if any(dev.is_vmstate for dev in reader.header.devices):
                raise VmaError("archives with a vmstate stream cannot be recompressed")
            with atomic_output(dest, temp_path(dest)) as out, \
                    open_compressor(out, Compression.ZSTD, options) as compressor:
                writer = VmaWriter(compressor, uuid=reader.uuid, ctime=reader.ctime)
                for name, data in reader.header.configs:
                    writer.add_config(name, data)
                ids = {dev.dev_id: writer.add_device(dev.name, dev.size) for dev in reader.header.devices}
                for extent in reader.extents(clusters=False):
                    writer.write_reused_extent(_parts(extent, ids))
                writer.close()
                assert writer.index is not None
                with writer.index:
                    embed_index(writer.index, compressor, writer.bytes_written)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise VmaError(f"cannot write archive {dest}: {exc.strerror or exc}") from exc
    log.info("wrote %s: %d extents, %d bytes of VMA", dest, writer.extents_written, writer.bytes_written)
    return writer


def _parts(extent: Extent, ids: dict[int, int]) -> list[ReusedPart]:
    """The extent's used slots, FRAME_SLOTS at a time, each with its stored blocks."""
    parts = []
    slots: list[tuple[int, int, int]] = []
    start = pos = 0
    payload = memoryview(extent.payload)
    for info in extent.blockinfo:
        mask, dev_id, cluster = fmt.split_blockinfo(info)
        if dev_id == 0:
            continue
        slots.append((ids[dev_id], cluster, mask))
        pos += mask.bit_count() * fmt.BLOCK_SIZE
        if len(slots) == FRAME_SLOTS:
            parts.append(ReusedPart(tuple(slots), payload[start:pos]))
            slots, start = [], pos
    if slots:
        parts.append(ReusedPart(tuple(slots), payload[start:pos]))
    return parts
