"""Which clusters of a device have been seen: a bitmap, 1 bit per cluster.

The bitmap is split into chunks allocated on first use, so memory follows the
clusters actually seen, not the device size an archive claims: a hostile
header announcing a 16 EiB disk costs nothing until data for it arrives.
"""

from __future__ import annotations

CHUNK_BYTES = 8192
CHUNK_BITS = CHUNK_BYTES * 8  # 65536 clusters = 4 GiB of disk per chunk


class ClusterMap:
    """Set of cluster numbers in ``[0, count)`` with duplicate detection and a first-gap query."""

    __slots__ = ("_chunks", "count", "seen")

    def __init__(self, count: int) -> None:
        self.count = count
        self._chunks: dict[int, bytearray] = {}
        self.seen = 0

    def add(self, cluster: int) -> bool:
        """Mark ``cluster`` seen; False if it was seen before (the caller reports the duplicate)."""
        chunk_index, bit = divmod(cluster, CHUNK_BITS)
        chunk = self._chunks.get(chunk_index)
        if chunk is None:
            chunk = self._chunks[chunk_index] = bytearray(CHUNK_BYTES)
        byte_index = bit >> 3
        flag = 1 << (bit & 7)
        value = chunk[byte_index]
        if value & flag:
            return False
        chunk[byte_index] = value | flag
        self.seen += 1
        return True

    def __contains__(self, cluster: int) -> bool:
        chunk_index, bit = divmod(cluster, CHUNK_BITS)
        chunk = self._chunks.get(chunk_index)
        return chunk is not None and bool(chunk[bit >> 3] & (1 << (bit & 7)))

    def first_missing(self) -> int | None:
        """The lowest cluster in ``[0, count)`` not seen, or None; stops at the first absent chunk."""
        if self.seen == self.count:
            return None
        chunk_index = 0
        while chunk_index * CHUNK_BITS < self.count:
            chunk = self._chunks.get(chunk_index)
            base = chunk_index * CHUNK_BITS
            if chunk is None:
                return base
            full_prefix = len(chunk) - len(chunk.lstrip(b"\xff"))
            if full_prefix < CHUNK_BYTES:
                value = chunk[full_prefix]
                bit = (~value & (value + 1)).bit_length() - 1  # lowest clear bit
                missing = base + full_prefix * 8 + bit
                return missing if missing < self.count else None
            chunk_index += 1
        return None
