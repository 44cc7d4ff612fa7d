"""Build the index of an archive that has none (one Proxmox made, or one from before indexes) in one pass.

The whole archive is read once, front to back, with every check of the reader: the
digests need every cluster's data anyway, so walking the extent headers with seeks
would save nothing. A ``.vma.zst`` is read frame by frame so the frame table comes
along; it allows random access only when every frame is small enough to be
decompressed alone (qmpbackup's own framing). The result always goes to the sidecar
``<archive>.index``: an archive is never modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.compress import ZSTD_MAGIC
from qmpbackup.vma.archive_io import archive_head, open_archive, open_input
from qmpbackup.vma.index import MAX_FRAME_PLAIN, IndexBuilder, slot_digests
from qmpbackup.vma.reader import VmaReader
from qmpbackup.zstd_frames import Frame, FrameTrackingSource

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ScannedIndex:
    """An index built from an archive: the builder, the plain stream's length, and whether it can seek."""

    builder: IndexBuilder
    plain_size: int
    random_access: bool


def scan_archive(path: Path) -> ScannedIndex:
    """Read ``path`` once and return its index (the caller writes and closes the builder)."""
    if archive_head(str(path), len(ZSTD_MAGIC)) == ZSTD_MAGIC:
        with open_input(str(path)) as raw:
            source = FrameTrackingSource(raw, keep_limit=0)
            reader = VmaReader(source)
            builder = _scan(reader)
            frames = source.take_frames(1 << 63)
        framed = bool(frames) and all(not f.streamed and f.plain_end - f.plain_start <= MAX_FRAME_PLAIN
                                      for f in frames)
        builder.set_frames(_table(frames), framed)
        return ScannedIndex(builder, reader.offset, framed)
    with open_archive(str(path)) as plain:
        reader = VmaReader(plain)
        builder = _scan(reader)
    return ScannedIndex(builder, reader.offset, archive_head(str(path), 4) == b"VMA\0")


def _scan(reader: VmaReader) -> IndexBuilder:
    builder = IndexBuilder(reader.uuid, [(d.dev_id, d.name, d.size) for d in reader.devices.values()])
    try:
        for extent in reader.extents(clusters=False):
            builder.add_extent(extent.offset, extent.block_count, slot_digests(extent.blockinfo, extent.payload))
    except BaseException:
        builder.close()
        raise
    return builder


def _table(frames: list[Frame]) -> list[tuple[int, int]]:
    """The index's frame table: each frame's (compressed, plain) start, then the ends."""
    if not frames:
        return []
    return [*((f.raw_start, f.plain_start) for f in frames), (frames[-1].raw_end, frames[-1].plain_end)]
