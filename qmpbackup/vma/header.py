"""Encode and decode the VMA archive header (docs/format.md F2-F4).

Decoding runs the header checks in the order the Proxmox reader runs them
(docs/format.md R1), so a broken header is reported with the same rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from qmpbackup.render import display_name
from qmpbackup.vma import format as fmt
from qmpbackup.vma.errors import VmaError, VmaFormatError


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One registered device (disk) of an archive."""

    dev_id: int
    name: str
    size: int

    @property
    def clusters(self) -> int:
        return fmt.cluster_count(self.size)

    @property
    def is_vmstate(self) -> bool:
        return self.name == fmt.VMSTATE_NAME


@dataclass(frozen=True, slots=True)
class VmaHeader:
    """The decoded header; ``configs`` keeps the archive's order and any duplicate names."""

    uuid: UUID
    ctime: int
    header_size: int
    blob_buffer_offset: int
    blob_buffer_size: int
    configs: tuple[tuple[str, bytes], ...]
    devices: tuple[DeviceInfo, ...]


def decode_name(raw: bytes) -> str:
    """Names are bytes in the archive; surrogateescape keeps any byte sequence reversible."""
    return raw.decode("utf-8", errors="surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", errors="surrogateescape")


def encode_header(
    uuid: UUID,
    ctime: int,
    configs: Sequence[tuple[bytes, bytes]],
    devices: Sequence[tuple[bytes, int]],
) -> bytes:
    """Build the header as Proxmox lays it out (F2, F3): configs in slots 0.., devices as dev_id 1..

    ``configs`` holds (name without NUL, data); ``devices`` holds (name without NUL, size).
    """
    if len(configs) > fmt.MAX_CONFIGS:
        raise VmaError(f"too many config files: {len(configs)} (at most {fmt.MAX_CONFIGS})")
    if len(devices) > fmt.MAX_DEV_ID:
        raise VmaError(f"too many devices: {len(devices)} (at most {fmt.MAX_DEV_ID})")
    blobs = bytearray(b"\0")  # pad byte: pointer 0 means "none"

    def add_blob(data: bytes) -> int:
        if len(data) > fmt.MAX_BLOB_SIZE:
            raise VmaError(f"VMA blob too large: {len(data)} bytes (at most {fmt.MAX_BLOB_SIZE})")
        pos = len(blobs)
        blobs.extend(fmt.BLOB_LEN.pack(len(data)))
        blobs.extend(data)
        return pos

    config_names = [0] * fmt.MAX_CONFIGS
    config_data = [0] * fmt.MAX_CONFIGS
    for slot, (name, data) in enumerate(configs):
        config_names[slot] = add_blob(name + b"\0")
        config_data[slot] = add_blob(data)
    device_ptrs = [add_blob(name + b"\0") for name, _size in devices]

    header_size = fmt.HEADER_FIXED_SIZE + fmt.round_up(len(blobs), fmt.HEADER_ALIGN)
    if header_size > fmt.MAX_WRITER_HEADER_SIZE:
        raise VmaError(
            f"VMA header too large: {header_size} bytes (at most {fmt.MAX_WRITER_HEADER_SIZE}); "
            "config files are too big"
        )
    buf = bytearray(header_size)
    fmt.HEADER_PREFIX.pack_into(
        buf, 0, fmt.MAGIC, fmt.VERSION, uuid.bytes, ctime, bytes(16),
        fmt.BLOB_BUFFER_OFFSET, len(blobs), header_size,
    )
    fmt.CONFIG_TABLE.pack_into(buf, fmt.CONFIG_NAMES_OFFSET, *config_names)
    fmt.CONFIG_TABLE.pack_into(buf, fmt.CONFIG_DATA_OFFSET, *config_data)
    for dev_id, ((_name, size), ptr) in enumerate(zip(devices, device_ptrs, strict=True), start=1):
        fmt.DEV_INFO.pack_into(buf, fmt.DEV_INFO_OFFSET + fmt.DEV_INFO.size * dev_id, ptr, 0, size)
    buf[fmt.BLOB_BUFFER_OFFSET : fmt.BLOB_BUFFER_OFFSET + len(blobs)] = blobs
    buf[fmt.HEADER_MD5] = hashlib.md5(buf).digest()
    return bytes(buf)


def check_fixed_part(fixed: bytes) -> int:
    """First checks on the 12288-byte fixed part (R1.2, R1.3); returns header_size."""
    magic, _version, _uuid, _ctime, _md5, _boff, _bsize, header_size = fmt.HEADER_PREFIX.unpack_from(fixed)
    if magic != fmt.MAGIC:
        raise VmaFormatError("not a vma file - wrong magic number", 0)
    if header_size <= fmt.HEADER_FIXED_SIZE:
        raise VmaFormatError(f"wrong vma header size {header_size}", 56)
    if header_size > fmt.MAX_READER_HEADER_SIZE:
        raise VmaFormatError(
            f"wrong vma header size {header_size} (larger than the {fmt.MAX_READER_HEADER_SIZE} bytes accepted)",
            56,
        )
    return int(header_size)


def _blob_chain(blobs: bytes) -> dict[int, bytes]:
    """Every blob reachable by walking length prefixes from offset 1 (F3); keys are offsets."""
    found: dict[int, bytes] = {}
    pos = 1
    size = len(blobs)
    while pos + 2 <= size:
        (length,) = fmt.BLOB_LEN.unpack_from(blobs, pos)
        end = pos + 2 + length
        if end <= size:
            found[pos] = blobs[pos + 2 : end]
        pos = end
    return found


def _string(blobs: dict[int, bytes], ptr: int) -> bytes | None:
    """A string blob ends with its NUL; the name is everything before that last byte."""
    blob = blobs.get(ptr)
    if blob is None or not blob or blob[-1] != 0:
        return None
    return blob[:-1]


def _check_device(dev_id: int, name: bytes, size: int, names: set[bytes], entry: int) -> None:
    """R1.11-R1.13 (ours): every command sees the same devices, each one addressable and named once."""
    if size > fmt.MAX_DEVICE_SIZE:
        raise VmaFormatError(
            f"device {dev_id} size {size} is larger than the {fmt.MAX_DEVICE_SIZE} bytes a VMA archive can address",
            entry + 8,
        )
    if not name:
        raise VmaFormatError(f"device {dev_id} has an empty name", entry)
    if name in names:
        raise VmaFormatError(f"duplicate device name {display_name(decode_name(name))}", entry)


def decode_header(buf: bytes) -> VmaHeader:
    """Check and decode a complete header (R1.5-R1.10); ``buf`` is header_size bytes."""
    (_magic, version, uuid_bytes, ctime, md5, blob_offset, blob_size, header_size) = (
        fmt.HEADER_PREFIX.unpack_from(buf)
    )
    zeroed = bytearray(buf)
    zeroed[fmt.HEADER_MD5] = bytes(16)
    if hashlib.md5(zeroed).digest() != md5:
        raise VmaFormatError("wrong vma header checksum", 32)
    if version != fmt.VERSION:
        raise VmaFormatError(f"wrong vma version {version}", 4)
    if blob_offset < fmt.HEADER_FIXED_SIZE:
        raise VmaFormatError(f"wrong vma blob buffer offset {blob_offset}", 48)
    if blob_offset + blob_size > header_size:
        raise VmaFormatError(f"wrong vma blob buffer size {blob_offset}/{blob_size}", 52)
    blobs = _blob_chain(buf[blob_offset : blob_offset + blob_size])

    names = fmt.CONFIG_TABLE.unpack_from(buf, fmt.CONFIG_NAMES_OFFSET)
    datas = fmt.CONFIG_TABLE.unpack_from(buf, fmt.CONFIG_DATA_OFFSET)
    configs: list[tuple[str, bytes]] = []
    for slot, (name_ptr, data_ptr) in enumerate(zip(names, datas, strict=True)):
        if not (name_ptr and data_ptr):
            continue
        name = _string(blobs, name_ptr)
        data = blobs.get(data_ptr)
        if name is None or data is None:
            raise VmaFormatError("vma contains invalid data pointers", fmt.CONFIG_NAMES_OFFSET + 4 * slot)
        configs.append((decode_name(name), data))

    devices: list[DeviceInfo] = []
    dev_names: set[bytes] = set()
    for dev_id in range(1, fmt.DEVICE_SLOTS):
        entry = fmt.DEV_INFO_OFFSET + fmt.DEV_INFO.size * dev_id
        name_ptr, _reserved, size = fmt.DEV_INFO.unpack_from(buf, entry)
        if size == 0:
            continue
        name = _string(blobs, name_ptr) if name_ptr else None
        if name is None:
            continue  # the Proxmox reader ignores such a slot silently (R1.10)
        _check_device(dev_id, name, size, dev_names, entry)
        dev_names.add(name)
        devices.append(DeviceInfo(dev_id, decode_name(name), size))

    return VmaHeader(
        uuid=UUID(bytes=uuid_bytes),
        ctime=ctime,
        header_size=header_size,
        blob_buffer_offset=blob_offset,
        blob_buffer_size=blob_size,
        configs=tuple(configs),
        devices=tuple(devices),
    )
