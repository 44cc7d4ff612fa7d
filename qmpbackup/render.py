"""Human-readable sizes and durations, spelled exactly as vzdump's log lines spell them.

Keeping the spelling identical lets people (and their log scrapers) read our
logs the way they read vzdump's.
"""

from __future__ import annotations

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


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


def render_size_decimal(size: int) -> str:
    """``5.20GB``: the ``archive file size`` spelling (decimal units, no space)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1000
    raise AssertionError("unreachable")
