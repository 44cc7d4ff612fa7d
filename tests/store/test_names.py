"""vzdump file names: build, parse, sidecars."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpbackup.store.names import (
    archive_name,
    log_name,
    notes_name,
    parse_archive_name,
    parse_backup_name,
    protected_name,
    temp_name,
)

WHEN = datetime(2024, 3, 29, 14, 37, 12)


def test_archive_name_and_sidecars() -> None:
    name = archive_name(100, WHEN, ".zst")
    assert name == "vzdump-qemu-100-2024_03_29-14_37_12.vma.zst"
    assert temp_name(name) == "vzdump-qemu-100-2024_03_29-14_37_12.vma.dat"
    assert log_name(name) == "vzdump-qemu-100-2024_03_29-14_37_12.log"
    assert notes_name(name) == name + ".notes"
    assert protected_name(name) == name + ".protected"
    plain = archive_name(100, WHEN, "")
    assert temp_name(plain) == "vzdump-qemu-100-2024_03_29-14_37_12.dat"
    assert log_name(plain) == "vzdump-qemu-100-2024_03_29-14_37_12.log"


def test_paths_stay_paths() -> None:
    archive = Path("/d/vzdump-qemu-100-2024_03_29-14_37_12.vma.gz")
    assert temp_name(archive) == Path("/d/vzdump-qemu-100-2024_03_29-14_37_12.vma.dat")
    assert log_name(archive) == Path("/d/vzdump-qemu-100-2024_03_29-14_37_12.log")
    assert notes_name("/d/x.vma") == "/d/x.vma.notes"


def test_parse() -> None:
    parsed = parse_archive_name("/dump/vzdump-qemu-100-2024_03_29-14_37_12.vma.lzo")
    assert parsed is not None
    assert (parsed.vmid, parsed.time, parsed.ext, parsed.vmtype) == (100, WHEN, ".vma.lzo", "qemu")
    assert parsed.epoch(timezone.utc) == int(WHEN.replace(tzinfo=timezone.utc).timestamp())


@pytest.mark.parametrize(
    "name",
    [
        "vzdump-qemu-99-2024_03_29-14_37_12.vma",  # VMID below 100
        "vzdump-qemu-100-2024_13_29-14_37_12.vma",  # no month 13
        "vzdump-qemu-100-2024_03_29-14_37_12.vma.xz",
        "vzdump-qemu-100-2024_03_29-14_37_12.log",
        "vzdump-100-renamed.vma",
        "vzdump-qemu-100-2024_03_29-14_37_12.vma.zst.notes",
    ],
)
def test_not_archives(name: str) -> None:
    assert parse_backup_name(name) is None


def test_lxc_is_a_backup_but_not_an_archive() -> None:
    name = "vzdump-lxc-100-2024_03_29-14_37_12.tar.zst"
    assert parse_backup_name(name) is not None
    assert parse_archive_name(name) is None


@given(
    vmid=st.integers(100, 999_999_999),
    when=st.datetimes(datetime(1970, 1, 1), datetime(9999, 12, 31)).map(lambda d: d.replace(microsecond=0)),
    ext=st.sampled_from(["", ".zst", ".gz", ".lzo"]),
)
def test_round_trip(vmid: int, when: datetime, ext: str) -> None:
    parsed = parse_archive_name(archive_name(vmid, when, ext))
    assert parsed is not None
    assert (parsed.vmid, parsed.time, parsed.ext) == (vmid, when, ".vma" + ext)
    assert parsed.name == archive_name(vmid, when, ext)
