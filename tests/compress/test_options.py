"""vzdump's option semantics: compress values, magic bytes, thread counts and compressor commands."""

from __future__ import annotations

import pytest

from qmpbackup.compress import (
    Compression,
    CompressOptions,
    compressor_command,
    detect,
    parse_compress,
    zstd_thread_count,
)
from qmpbackup.errors import UsageError


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", Compression.NONE), ("none", Compression.NONE), ("1", Compression.LZO), ("lzo", Compression.LZO),
     ("gzip", Compression.GZIP), ("zstd", Compression.ZSTD)],
)
def test_parse_compress(value: str, expected: Compression) -> None:
    assert parse_compress(value) is expected


@pytest.mark.parametrize("value", ["", "2", "bzip2", "ZSTD", "pigz", "yes"])
def test_parse_compress_rejects(value: str) -> None:
    with pytest.raises(UsageError, match="invalid compress value"):
        parse_compress(value)


def test_extensions() -> None:
    assert [c.extension for c in Compression] == ["", ".zst", ".gz", ".lzo"]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x28\xb5\x2f\xfd\x04\x00", Compression.ZSTD),
        (b"\x1f\x8b\x08\x00", Compression.GZIP),
        (b"\x89LZO\x00\r\n\x1a\n\x10", Compression.LZO),
        (b"\x89LZO\x00\r\n\x1a", Compression.NONE),  # one byte short of lzop's magic
        (b"VMA\x00", Compression.NONE),
        (b"", Compression.NONE),
    ],
)
def test_detect(head: bytes, expected: Compression) -> None:
    assert detect(head) is expected


@pytest.mark.parametrize(
    ("option", "cpus", "threads"), [(1, 2, 1), (0, 2, 1), (0, 3, 2), (0, 8, 4), (0, 1, 1), (4, 2, 4)]
)
def test_zstd_threads_follow_vzdump(option: int, cpus: int, threads: int) -> None:
    assert zstd_thread_count(option, cpus) == threads


@pytest.mark.parametrize(
    ("pigz", "cpus", "argv"),
    [
        (0, 8, ["gzip", "--rsyncable"]),
        (1, 8, ["pigz", "-p", "4", "--rsyncable"]),
        (1, 3, ["pigz", "-p", "2", "--rsyncable"]),
        (6, 2, ["pigz", "-p", "6", "--rsyncable"]),
    ],
)
def test_gzip_command_follows_vzdump(pigz: int, cpus: int, argv: list[str]) -> None:
    assert compressor_command(Compression.GZIP, CompressOptions(pigz=pigz), cpus) == argv


def test_lzo_command() -> None:
    assert compressor_command(Compression.LZO, CompressOptions()) == ["lzop"]


@pytest.mark.parametrize("kwargs", [{"zstd_threads": -1}, {"pigz": -2}, {"ionice": 9}, {"ionice": -1}])
def test_bad_options_are_usage_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        CompressOptions(**kwargs)
