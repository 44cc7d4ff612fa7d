"""Text as people write it in config files and on the command line: the file, and whole numbers in it.

Every config file is read through :func:`read_config_text`, so a byte that is
not UTF-8 is reported with its file and line like any other config error; and
every whole number is parsed by :func:`parse_integer`, so each option takes
ASCII digits only (``int()`` also takes ``٣``, ``１００`` and ``1_000``) within
the bounds the value can be used with.
"""

from __future__ import annotations

from pathlib import Path

from qmpbackup.errors import ConfigError

INT64_MAX = (1 << 63) - 1  # Proxmox's schema integers (and QEMU's) are 64-bit signed
MAX_BWLIMIT_KIB = INT64_MAX // 1024  # QEMU takes a rate in bytes/s as a 64-bit integer
_DIGITS = frozenset("0123456789")


def parse_integer(text: str, low: int = 0, high: int = INT64_MAX) -> int:
    """``text`` (surrounding white space allowed, ``-`` only when ``low`` < 0) as an int in ``low..high``.

    :raise ValueError: not a whole number in ASCII digits, or out of range (one-line message).
    """
    value = text.strip()
    digits = value[1:] if value.startswith("-") and low < 0 else value
    if not digits or not set(digits) <= _DIGITS:
        raise ValueError(f"{_quoted(text)} is not a whole number (digits 0-9)")
    if len(digits.lstrip("0")) > len(str(max(abs(low), abs(high)))) or not low <= int(value, 10) <= high:
        raise ValueError(f"{_cut(value)} is out of range {low}..{high}")
    return int(value, 10)


def _cut(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def _quoted(text: str) -> str:
    return repr(_cut(text))


def read_config_text(path: Path) -> str:
    """The UTF-8 text of a config file.

    :raise FileNotFoundError: the file does not exist (callers decide whether that is fine).
    :raise ConfigError: it cannot be read, or a line is not UTF-8 (naming the file and line).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", str(path)) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"byte 0x{data[exc.start]:02x} in column {column} is not UTF-8 text", str(path),
                          line) from None
