"""The VMA byte layout: constants and fixed-size struct codecs.

Everything here follows ``docs/format.md`` section by section; each constant
cites its section (F1 = conventions, F2 = archive header, F3 = blob buffer,
F4 = device table, F5 = extents, F6 = cluster coverage, F7 = limits of this
implementation). Multi-byte integers are big-endian except the blob length
prefix (F3), which is little-endian.
"""

from __future__ import annotations

import functools
import struct
from typing import Final

# F1: units.
BLOCK_SIZE: Final = 4096  # zero-suppression unit
CLUSTER_SIZE: Final = 65536  # addressing unit, 16 blocks
BLOCKS_PER_CLUSTER: Final = CLUSTER_SIZE // BLOCK_SIZE
SECTOR_SIZE: Final = 512  # device sizes are whole sectors (F4)
FULL_MASK: Final = 0xFFFF  # every block of a cluster stored
#: All-zero data to compare with and to write from (one shared copy; slice it for shorter runs).
ZERO_CLUSTER: Final = bytes(CLUSTER_SIZE)
ZERO_BLOCK: Final = bytes(BLOCK_SIZE)

# F2: archive header.
MAGIC: Final = b"VMA\0"
VERSION: Final = 1
HEADER_FIXED_SIZE: Final = 12288  # fixed part; the blob buffer follows it
HEADER_ALIGN: Final = 512  # header_size is 12288 + a multiple of 512
# magic, version, uuid, ctime, md5sum, blob_buffer_offset, blob_buffer_size, header_size
HEADER_PREFIX: Final = struct.Struct(">4sI16sq16sIII")
HEADER_MD5: Final = slice(32, 48)  # zeroed while the MD5 is computed
CONFIG_NAMES_OFFSET: Final = 2044  # u32[256]
CONFIG_DATA_OFFSET: Final = 3068  # u32[256]
MAX_CONFIGS: Final = 256
CONFIG_TABLE: Final = struct.Struct(">256I")

# F4: device table, 256 entries of 32 bytes; the index is the dev_id.
DEV_INFO_OFFSET: Final = 4096
DEV_INFO: Final = struct.Struct(">IIQ16x")  # devname_ptr, reserved, size, reserved
DEVICE_SLOTS: Final = 256
MAX_DEV_ID: Final = 254  # writers hand out 1..254; 0 is unused, 255 reserved
VMSTATE_NAME: Final = "vmstate"  # legacy RAM-state stream, never written (F6)

# F3: blob buffer.
BLOB_BUFFER_OFFSET: Final = HEADER_FIXED_SIZE  # the only value writers use
BLOB_LEN: Final = struct.Struct("<H")  # little-endian length prefix
MAX_BLOB_SIZE: Final = 65535

# F5: extents.
EXTENT_MAGIC: Final = b"VMAE"
EXTENT_HEADER_SIZE: Final = 512
EXTENT_SLOTS: Final = 59  # cluster slots per extent header (Proxmox's C code calls it BLOCKS_PER_EXTENT)
WRITER_SLOTS: Final = 58  # Proxmox's writer flushes at 58 used slots; so do we
MAX_EXTENT_BLOCKS: Final = EXTENT_SLOTS * BLOCKS_PER_CLUSTER  # 944
MAX_EXTENT_SIZE: Final = EXTENT_HEADER_SIZE + EXTENT_SLOTS * CLUSTER_SIZE  # 3867136
# magic, reserved1, block_count, uuid, md5sum, blockinfo[59]
EXTENT_HEADER: Final = struct.Struct(f">4sHH16s16s{EXTENT_SLOTS}Q")
EXTENT_MD5: Final = slice(24, 40)
BLOCKINFO_SLOTS_OFFSET: Final = 40

# F7: limits of this implementation.
MAX_WRITER_HEADER_SIZE: Final = 524288  # the C writer's header buffer; we never write more
MAX_READER_HEADER_SIZE: Final = 1048576  # larger headers are rejected (memory bound)
MAX_CLUSTERS: Final = 1 << 32  # cluster_num is a u32 (F5)
MAX_DEVICE_SIZE: Final = MAX_CLUSTERS * CLUSTER_SIZE  # 256 TiB: larger devices can never be complete

assert HEADER_PREFIX.size == 60
assert EXTENT_HEADER.size == EXTENT_HEADER_SIZE
assert CONFIG_DATA_OFFSET + 4 * MAX_CONFIGS + 4 == DEV_INFO_OFFSET
assert DEV_INFO_OFFSET + DEV_INFO.size * DEVICE_SLOTS == HEADER_FIXED_SIZE


def blockinfo(mask: int, dev_id: int, cluster_num: int) -> int:
    """Pack one extent slot (F5): mask in bits 63..48, dev_id in 39..32, cluster in 31..0."""
    return (mask << 48) | (dev_id << 32) | cluster_num


def split_blockinfo(info: int) -> tuple[int, int, int]:
    """Unpack one extent slot into (mask, dev_id, cluster_num); bits 47..40 are ignored."""
    return info >> 48, (info >> 32) & 0xFF, info & 0xFFFFFFFF


def cluster_count(size: int) -> int:
    """Number of clusters covering a device of ``size`` bytes (F6)."""
    return (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE


def round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


@functools.lru_cache(maxsize=4096)
def stored_runs(mask: int) -> tuple[tuple[int, int], ...]:
    """F5: byte ranges ``(start, end)`` of the blocks a mask stores, adjacent blocks merged.

    Readers and writers copy or write one run at a time instead of one 4 KiB block.
    """
    runs: list[tuple[int, int]] = []
    block = 0
    while block < BLOCKS_PER_CLUSTER:
        if mask >> block & 1:
            first = block
            while block < BLOCKS_PER_CLUSTER and mask >> block & 1:
                block += 1
            runs.append((first * BLOCK_SIZE, block * BLOCK_SIZE))
        else:
            block += 1
    return tuple(runs)
