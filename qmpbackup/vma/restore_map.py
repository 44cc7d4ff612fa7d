"""``vma extract -r FIFO``: the device mapping lines qmrestore writes.

One line per device, options first, each ``NAME=VALUE:``, in any order, then
the write-zeroes flag and the target::

    [throttling.bps=<B>:][throttling.group=<id>:][cache=<mode>:][format=<fmt>:]<0|1>:<devname>=<path>
    skip=<devname>

until a line ``done``, an empty line or end of input. The flag is 1 when
the target may hold old data (zero blocks must be written) and 0 when it
reads as zeros already (zero blocks are skipped, the target stays sparse).
Errors use the C tool's "read map failed - ..." wording.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.errors import UsageError

log = logging.getLogger(__name__)

MAP_TIMEOUT_S = 3600.0  # qmrestore allocates every volume before it writes the map
MAX_LINE = 8191  # the C tool reads lines with an 8 KiB buffer
MAX_LINES = 1024  # at most 255 devices: anything longer is not a mapping
CACHE_MODES = frozenset({"none", "writeback", "writethrough", "directsync", "unsafe"})
_OPTIONS = ("format", "throttling.bps", "throttling.group", "cache")


class RestoreMapError(UsageError):
    """A mapping line or the mapping input is not what ``vma extract -r`` accepts."""


@dataclass(frozen=True, slots=True)
class RestoreMapEntry:
    """Where one archive device goes; ``skip`` entries have no path."""

    devname: str
    path: Path | None
    image_format: str | None = None
    write_zeroes: bool = True
    throttling_bps: int = 0
    throttling_group: str | None = None
    cache: str | None = None
    skip: bool = False


def _number(text: str) -> int:
    """A non-negative integer as ``qemu_strtou64(.., 0, ..)`` reads it: decimal, 0x hex or 0 octal."""
    try:
        if text.lower().startswith("0x"):
            return int(text[2:], 16)
        if len(text) > 1 and text.startswith("0"):
            return int(text[1:], 8)
        if text.isdigit():
            return int(text)
    except ValueError:
        pass
    raise RestoreMapError(f"read map failed - not a number: {text}")


def parse_map_line(line: str) -> RestoreMapEntry:
    """One mapping line without its newline.

    :raise RestoreMapError: the line is malformed (the message quotes it).
    """
    if line.startswith("skip"):
        if len(line) < 6 or line[4] != "=":
            raise RestoreMapError(f"read map failed - option 'skip' has no value ('{line}')")
        return RestoreMapEntry(devname=line[5:], path=None, skip=True)
    options: dict[str, str] = {}
    rest = line
    while True:
        name = next((opt for opt in _OPTIONS if rest.startswith(opt + "=")), None)
        if name is None:
            break
        if name in options:
            raise RestoreMapError(f"read map failed - duplicate value for option '{name}'")
        value, colon, after = rest[len(name) + 1 :].partition(":")
        if not colon:
            raise RestoreMapError(f"read map failed - option '{name}' not terminated ('{line}')")
        options[name] = value
        rest = after
    if rest[:2] not in ("0:", "1:"):
        raise RestoreMapError(f"read map failed - parse error ('{line}')")
    devname, sep, path = rest[2:].partition("=")
    if not sep or not devname:
        raise RestoreMapError(f"read map failed - no dev name specified ('{line}')")
    if not path:
        raise RestoreMapError(f"read map failed - no path for device '{devname}' ('{line}')")
    cache = options.get("cache")
    if cache is not None and cache not in CACHE_MODES:
        raise RestoreMapError(f"invalid cache option: {cache}")
    return RestoreMapEntry(
        devname=devname,
        path=Path(path),
        image_format=options.get("format") or None,
        write_zeroes=rest[0] == "1",
        throttling_bps=_number(options["throttling.bps"]) if "throttling.bps" in options else 0,
        throttling_group=options.get("throttling.group") or None,
        cache=cache,
    )


def parse_map(lines: list[str]) -> dict[str, RestoreMapEntry]:
    """Mapping lines (up to ``done`` or an empty line) by device name.

    :raise RestoreMapError: a malformed line, or a device mapped twice.
    """
    entries: dict[str, RestoreMapEntry] = {}
    for line in lines:
        if line in ("", "done"):
            break
        entry = parse_map_line(line)
        if entry.devname in entries:
            raise RestoreMapError(f"read map failed - device '{entry.devname}' mapped twice")
        entries[entry.devname] = entry
    return entries


def read_map_lines(path: Path, timeout_s: float = MAP_TIMEOUT_S) -> list[str]:
    """Lines from ``path`` (a FIFO, or any file) up to ``done``, an empty line or end of input.

    The FIFO is opened without blocking and polled, so waiting for the writer
    to show up is bounded by ``timeout_s`` like every other wait.

    :raise RestoreMapError: cannot open, a read error, a line too long, too many lines, or timed out.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreMapError(f"unable to open fifo {path} - {exc.strerror or exc}") from exc
    try:
        return _read_lines(fd, path, time.monotonic() + timeout_s, timeout_s)
    finally:
        os.close(fd)


def _read_lines(fd: int, path: Path, deadline: float, timeout_s: float) -> list[str]:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = b""
    lines: list[str] = []
    eof = False
    while not eof:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RestoreMapError(f"no device mapping from {path} after {timeout_s:.0f} s")
        if not poller.poll(left * 1000):
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise RestoreMapError(f"read map failed - {path}: {exc.strerror or exc}") from exc
        eof = not chunk
        buf += chunk
        *complete, buf = buf.split(b"\n")
        if eof and buf:
            complete.append(buf)  # a last line without a newline still counts
        for raw in complete:
            if len(raw) > MAX_LINE:
                raise RestoreMapError(f"read map failed - line longer than {MAX_LINE} bytes")
            line = raw.decode("utf-8", errors="surrogateescape")
            lines.append(line)
            if line in ("", "done"):
                return lines
            if len(lines) > MAX_LINES:
                raise RestoreMapError(f"read map failed - more than {MAX_LINES} lines")
        if len(buf) > MAX_LINE:
            raise RestoreMapError(f"read map failed - line longer than {MAX_LINE} bytes")
    return lines
