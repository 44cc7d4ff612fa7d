"""Shared-library closure of guest binaries, read from their ELF headers.

Why not ``ldd``: it runs the binary's loader on the host, and the guest's files come from
packages that are not installed here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from qmpbackup.guest_image.debs import BuildError

# glibc dlopen()s libgcc_s for thread cancellation; it is not in DT_NEEDED
DLOPENED = ("libgcc_s.so.1",)


def elf_needed(data: bytes) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _pa, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []

    def file_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return int(offset + vaddr - start)
        raise BuildError(f"ELF address {vaddr:#x} is in no PT_LOAD segment")

    needed_offsets, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == 1:
            needed_offsets.append(value)
        elif tag == 5:
            strtab = file_offset(value)
    if strtab is None:
        return []
    return [data[strtab + o:data.index(b"\0", strtab + o)].decode() for o in needed_offsets]


def library_closure(binaries: Iterable[Path], libdirs: list[Path]) -> dict[str, Path]:
    """soname -> real file for everything ``binaries`` need, transitively (plus DLOPENED)."""
    def find(soname: str, needed_by: str) -> Path:
        for d in libdirs:
            candidate = d / soname
            if candidate.exists():
                return candidate.resolve()
        raise BuildError(f"shared library {soname} (needed by {needed_by}) is in no downloaded package")

    found: dict[str, Path] = {}
    queue: list[tuple[str, str]] = [(s, "glibc") for s in (*DLOPENED, "ld-linux-x86-64.so.2")]
    for binary in binaries:
        queue += [(s, binary.name) for s in elf_needed(binary.read_bytes())]
    while queue:
        soname, needed_by = queue.pop()
        if soname in found:
            continue
        found[soname] = find(soname, needed_by)
        queue += [(s, soname) for s in elf_needed(found[soname].read_bytes())]
    return found
