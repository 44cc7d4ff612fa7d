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
