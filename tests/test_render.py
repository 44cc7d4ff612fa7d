from __future__ import annotations

import pytest

from qmpbackup.render import (
    display_name,
    render_archive_size,
    render_bytes,
    render_duration,
    render_hms,
    render_rate,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1 << 30, "1.0 GiB"), (32 << 30, "32.0 GiB"),
     (357913941, "341.3 MiB")],
)
def test_render_bytes(value: int, text: str) -> None:
    assert render_bytes(value) == text


def test_render_bytes_two_decimals() -> None:
    assert render_bytes(20.11 * (1 << 30), 2) == "20.11 GiB"


def test_rate_and_durations() -> None:
    assert render_rate(1 << 20, 0) == "0 B/s"
    assert render_rate(10 << 20, 2) == "5.0 MiB/s"
    assert render_duration(3) == "3s"
    assert render_duration(112) == "1m 52s"
    assert render_duration(3723) == "1h 2m 3s"
    assert render_hms(118) == "00:01:58"


def test_decimal_sizes() -> None:
    assert render_archive_size(13 * 2**20 + 5) == "13MB"
    assert render_archive_size(int(1.21 * 2**30)) == "1.21GB"
    assert render_archive_size(5000) == "4KB"
    assert render_archive_size(3 * 2**40) == "3.00TB"


def test_display_name_keeps_a_name_on_one_line() -> None:
    assert display_name("drive-scsi0") == "drive-scsi0"
    assert display_name("a\nINFO: forged\r\tb") == "a\\nINFO: forged\\r\\tb"
    assert display_name("esc\x1b[2Jx\x7f\x85") == "esc\\x1b[2Jx\\x7f\\x85"
    assert display_name("line\u2028sep\U000e0001") == "line\\u2028sep\\U000e0001"
    assert display_name("dr\udcffive") == "dr\\xffive"  # an undecodable byte, surrogate-escaped
    assert display_name("dr\udcffive\n", keep_bytes=True) == "dr\udcffive\\n"
    assert display_name("back\\slash ünïcode") == "back\\slash ünïcode"
