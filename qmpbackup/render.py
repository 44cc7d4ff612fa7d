"""Human-readable sizes and durations, spelled exactly as vzdump's log lines spell them, and names
from outside made safe to print.

Keeping the spelling identical lets people (and their log scrapers) read our
logs the way they read vzdump's.
"""

from __future__ import annotations

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_name(name: str, *, keep_bytes: bool = False) -> str:
    """A name from outside (an archive, a config file) fit for one line of output or of a log.

    Control and other unprintable characters become backslash escapes (``\\n``, ``\\x1b``,
    ``\\u2028``), so a name can neither start a line of its own nor move the cursor. Bytes that are
    not UTF-8 (decoded with surrogateescape) become ``\\xNN`` too, unless ``keep_bytes``: ``vma
    list`` prints names back as the archive's bytes, as Proxmox's tool does.
    """
    if name.isprintable():
        return name
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(char if keep_bytes else f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def render_bytes(size: float, precision: int = 1) -> str:
    """``1.0 GiB``, ``341.3 MiB``, ``0 B``: binary units, as vzdump's progress lines."""
    value = float(size)
    unit = 0
    while abs(value) >= 1024 and unit < len(_BINARY_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{int(value)} B"
    return f"{value:.{precision}f} {_BINARY_UNITS[unit]}"


def render_rate(size: float, seconds: float) -> str:
    """A transfer rate such as ``292.6 MiB/s``; ``0 B/s`` when no time has passed."""
    if seconds <= 0:
        return "0 B/s"
    return render_bytes(size / seconds) + "/s"


def render_duration(seconds: float) -> str:
    """``1h 2m 3s`` as in vzdump's progress lines; leading zero units are left out."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)


def render_hms(seconds: float) -> str:
    """``00:01:58``: the duration in vzdump's ``Finished Backup of VM`` line."""
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def render_archive_size(size: int) -> str:
    """``13MB``, ``1.21GB``: vzdump's ``archive file size`` spelling.

    Binary steps with short labels: whole KB and MB, two decimals from GB up.
    """
    mib = size / (1 << 20)
    if mib < 1:
        return f"{int(size / 1024)}KB"
    if mib < 1024:
        return f"{int(mib)}MB"
    gib = mib / 1024
    return f"{gib:.2f}GB" if gib < 1024 else f"{gib / 1024:.2f}TB"
