"""One conformance suite for every compression: round trips, magic detection, the real CLI tools, damage."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest

from qmpbackup.atomic_file import atomic_output
from qmpbackup.compress import (
    Compression,
    CompressError,
    CompressOptions,
    Decompressor,
    open_compressor,
    open_decompressor,
)

ALL = list(Compression)
PACKED = [c for c in Compression if c is not Compression.NONE]
CHILD = [Compression.GZIP, Compression.LZO]

CLI_DECOMPRESS = {
    Compression.NONE: ["cat"],
    Compression.ZSTD: ["zstd", "-q", "-dc"],
    Compression.GZIP: ["gzip", "-dc"],
    Compression.LZO: ["lzop", "-dc"],
}
CLI_COMPRESS = {
    Compression.NONE: [["cat"]],
    Compression.ZSTD: [["zstd", "-q", "-c"], ["zstd", "-q", "-T2", "-c"]],
    Compression.GZIP: [["gzip", "-c"], ["pigz", "-p", "2", "-c"]],
    Compression.LZO: [["lzop", "-c"]],
}
OPTIONS = CompressOptions(zstd_threads=0, pigz=1)


def compress_to(path: Path, compression: Compression, chunks: list[bytes], options: CompressOptions = OPTIONS) -> Path:
    final = path.with_name(path.name + compression.extension)
    with atomic_output(final, path.with_name(path.name + ".dat")) as out, open_compressor(
        out, compression, options
    ) as comp:
        for chunk in chunks:
            comp.write(chunk)
    return final


def read_all(dec: Decompressor, size: int = 65536) -> bytes:
    parts = []
    while piece := dec.read(size):
        parts.append(piece)
    return b"".join(parts)


def odd_chunks(data: bytes, seed: int = 7) -> list[bytes]:
    """Many small writes of odd sizes (1 byte to 70 KiB)."""
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 13, 4095, 4097, 65536, 70001))
        chunks.append(data[pos : pos + n])
        pos += n
    return chunks


@pytest.fixture(params=ALL, ids=lambda c: c.value)
def compression(request: pytest.FixtureRequest) -> Compression:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def archive(tmp_path: Path, compression: Compression, sample: bytes) -> Path:
    """The sample written by us in one big write."""
    return compress_to(tmp_path / "one", compression, [sample])


def read_file(path: Path) -> bytes:
    with open(path, "rb") as src, open_decompressor(src) as dec:
        data = read_all(dec)
        assert dec.at_eof
        return data


@contextlib.contextmanager
def pipe_of(data: bytes) -> Iterator[BinaryIO]:
    """A non-seekable stream (os.pipe) that delivers ``data`` from a thread."""
    rfd, wfd = os.pipe()

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), open(wfd, "wb") as w:
            w.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with open(rfd, "rb") as r:
        yield r
    writer.join(10)


def test_round_trip_many_small_writes(tmp_path: Path, compression: Compression, sample: bytes) -> None:
    path = compress_to(tmp_path / "small", compression, odd_chunks(sample))
    assert read_file(path) == sample


def test_round_trip_one_big_write(archive: Path, sample: bytes) -> None:
    assert read_file(archive) == sample


def test_empty_stream(tmp_path: Path, compression: Compression) -> None:
    path = compress_to(tmp_path / "empty", compression, [])
    assert read_file(path) == b""


def test_detected_by_magic_through_a_pipe(archive: Path, compression: Compression, sample: bytes) -> None:
    with pipe_of(archive.read_bytes()) as stream, open_decompressor(stream) as dec:
        assert dec.compression is compression
        assert read_all(dec, 100_000) == sample


def test_detected_from_a_child_process_stdout(archive: Path, compression: Compression, sample: bytes) -> None:
    cat = subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE)
    assert cat.stdout is not None
    with cat.stdout, open_decompressor(cat.stdout) as dec:
        assert dec.compression is compression
        assert read_all(dec) == sample
    assert cat.wait(10) == 0


def test_cli_tool_reads_our_output(archive: Path, compression: Compression, sample: bytes) -> None:
    result = subprocess.run([*CLI_DECOMPRESS[compression], str(archive)], capture_output=True, timeout=60, check=True)
    assert result.stdout == sample


@pytest.mark.parametrize("variant", [0, 1], ids=["default", "alternative"])
def test_we_read_cli_tool_output(
    tmp_path: Path, compression: Compression, sample: bytes, variant: int
) -> None:
    commands = CLI_COMPRESS[compression]
    argv = commands[variant % len(commands)]
    packed = subprocess.run(argv, input=sample, capture_output=True, timeout=60, check=True).stdout
    (tmp_path / "cli").write_bytes(packed)
    assert read_file(tmp_path / "cli") == sample
    with pipe_of(packed) as stream, open_decompressor(stream) as dec:
        assert read_all(dec) == sample


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP], ids=lambda c: c.value)
def test_concatenated_streams_are_read_whole(tmp_path: Path, compression: Compression) -> None:
    """zstd frames and gzip members may be concatenated (zstd -c a b, cat x.gz y.gz)."""
    one = compress_to(tmp_path / "a", compression, [b"first part\n" * 1000]).read_bytes()
    two = compress_to(tmp_path / "b", compression, [b"second part\n" * 1000]).read_bytes()
    with pipe_of(one + two) as stream, open_decompressor(stream) as dec:
        assert read_all(dec) == b"first part\n" * 1000 + b"second part\n" * 1000


def damaged_versions(blob: bytes) -> dict[str, bytes]:
    middle = len(blob) // 2
    flipped = bytearray(blob)
    for offset in range(middle, middle + 64, 8):
        flipped[offset] ^= 0x5A
    return {
        "flipped": bytes(flipped),
        "half": blob[:middle],
        "last-bytes-cut": blob[:-3],
        "header-only": blob[:12],
    }


@pytest.mark.parametrize("damage", ["flipped", "half", "last-bytes-cut", "header-only"])
@pytest.mark.parametrize("compression", PACKED, ids=lambda c: c.value)
@pytest.mark.parametrize("through", ["file", "pipe"])
def test_damaged_input_raises_compress_error(
    tmp_path: Path, compression: Compression, sample: bytes, damage: str, through: str
) -> None:
    blob = compress_to(tmp_path / "x", compression, [sample]).read_bytes()
    bad = damaged_versions(blob)[damage]
    with pytest.raises(CompressError):
        if through == "file":
            (tmp_path / "bad").write_bytes(bad)
            read_file(tmp_path / "bad")
        else:
            with pipe_of(bad) as stream, open_decompressor(stream) as dec:
                read_all(dec)


def test_junk_and_tiny_input_pass_as_uncompressed() -> None:
    for junk in (b"", b"\x1f", b"not compressed at all"):
        with pipe_of(junk) as stream, open_decompressor(stream) as dec:
            assert dec.compression is Compression.NONE
            assert read_all(dec, 3) == junk


def the_child() -> psutil.Process:
    children = psutil.Process().children()
    assert len(children) == 1, children
    return children[0]


@pytest.mark.parametrize("compression", CHILD, ids=lambda c: c.value)
def test_killed_compressor_fails_the_write(tmp_path: Path, compression: Compression, sample: bytes) -> None:
    with open(tmp_path / "out", "wb") as out:
        comp = open_compressor(out, compression, OPTIONS)
        comp.write(sample[:100_000])
        child = the_child()
        child.kill()
        child_name = child.name()
        with pytest.raises(CompressError) as err:
            for _ in range(100):
                comp.write(sample)
            comp.close()
    assert "SIGKILL" in str(err.value)
    assert err.value.program in (child_name, "gzip", "pigz", "lzop")


@pytest.mark.parametrize("compression", CHILD, ids=lambda c: c.value)
def test_compressor_failing_at_close_is_reported_with_stderr(tmp_path: Path, compression: Compression) -> None:
    """A read-only destination: the child cannot write, exits non-zero, and its stderr is in the error."""
    with open(tmp_path / "ro", "wb"):
        pass
    with open(tmp_path / "ro", "rb") as out:  # noqa: SIM117 - the write end is deliberately wrong
        with pytest.raises(CompressError) as err:
            with open_compressor(out, compression, OPTIONS) as comp:
                comp.write(os.urandom(1 << 20))
    assert err.value.returncode not in (None, 0)
    if compression is Compression.GZIP:  # lzop exits 1 without a word here
        assert "Bad file descriptor" in err.value.stderr
    assert err.value.program is not None and err.value.program in str(err.value)


def test_missing_program_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with open(tmp_path / "out", "wb") as out, pytest.raises(CompressError, match="cannot start lzop"):
        open_compressor(out, Compression.LZO)


@pytest.mark.parametrize("compression", ALL, ids=lambda c: c.value)
def test_exception_inside_kills_the_compressor(tmp_path: Path, compression: Compression) -> None:
    temp = tmp_path / "x.dat"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(tmp_path / "x", temp) as out, open_compressor(out, compression, OPTIONS) as comp:
            comp.write(b"a" * 500_000)
            raise RuntimeError("boom")
    assert not temp.exists()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("opener", ["file", "pipe"])
def test_decompressor_stopped_early_reaps_its_child(tmp_path: Path, sample: bytes, opener: str) -> None:
    big = compress_to(tmp_path / "big", Compression.LZO, [sample] * 8)
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open(big, "rb") if opener == "file" else pipe_of(big.read_bytes()))
        dec = open_decompressor(stream)
        assert dec.read(1000)
        dec.abort()  # quiet: the consumer stopped on purpose
        dec.close()
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open(big, "rb") if opener == "file" else pipe_of(big.read_bytes()))
        dec = open_decompressor(stream)
        assert dec.read(1000)
        with pytest.raises(CompressError, match="left unread"):
            dec.close()


def test_leaving_the_context_with_an_exception_does_not_check(tmp_path: Path, sample: bytes) -> None:
    big = compress_to(tmp_path / "big", Compression.LZO, [sample] * 8)
    with pytest.raises(KeyError), open(big, "rb") as src, open_decompressor(src) as dec:
        dec.read(10)
        raise KeyError("consumer failed")


def test_close_verifies_the_end_when_the_consumer_stops_just_before_it(
    tmp_path: Path, compression: Compression, sample: bytes, archive: Path
) -> None:
    with open(archive, "rb") as src, open_decompressor(src) as dec:
        got = b""
        while len(got) < len(sample):
            got += dec.read(len(sample) - len(got))
    assert got == sample
    if compression is Compression.NONE:
        return  # nothing to verify
    assert dec.at_eof
    (tmp_path / "cut").write_bytes(archive.read_bytes()[:-3])
    with open(tmp_path / "cut", "rb") as src:
        dec = open_decompressor(src)
        # (zstd checks each of our frames whole before handing out its bytes: the cut shows on the read)
        with pytest.raises(CompressError):
            dec.read(len(sample) - (1 << 20))
            dec.close()
        dec.abort()


def test_read_after_close_is_refused(archive: Path) -> None:
    with open(archive, "rb") as src:
        dec = open_decompressor(src)
        dec.abort()
        with pytest.raises(Exception, match="closed"):
            dec.read(1)


def test_write_after_close_is_refused(tmp_path: Path, compression: Compression) -> None:
    with open(tmp_path / "out", "wb") as out:
        comp = open_compressor(out, compression, OPTIONS)
        comp.close()
        comp.close()
        with pytest.raises(Exception, match="closed"):
            comp.write(b"x")


def test_zstd_output_carries_a_content_checksum(tmp_path: Path) -> None:
    path = compress_to(tmp_path / "sum", Compression.ZSTD, [b"checked\n" * 10000])
    info = subprocess.run(["zstd", "-lv", str(path)], capture_output=True, text=True, timeout=30, check=True)
    assert "XXH64" in info.stdout


def test_zstd_bomb_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    """1 GiB of zeros packs into a few KiB; each read still returns at most about 1 MiB."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    with open(tmp_path / "bomb.zst", "wb") as out, cctx.stream_writer(out, closefd=False) as w:
        zeros = bytes(16 << 20)
        for _ in range(64):
            w.write(zeros)
    assert (tmp_path / "bomb.zst").stat().st_size < 1 << 20
    with open(tmp_path / "bomb.zst", "rb") as src, open_decompressor(src) as dec:
        total = 0
        while piece := dec.read(1 << 30):
            assert len(piece) <= 1 << 20
            total += len(piece)
    assert total == 1 << 30


def test_signal_name_in_error_for_terminated_child(tmp_path: Path) -> None:
    with open(tmp_path / "out", "wb") as out:
        comp = open_compressor(out, Compression.GZIP)
        os.kill(the_child().pid, signal.SIGTERM)
        with pytest.raises(CompressError, match="SIGTERM"):
            for _ in range(1000):
                comp.write(bytes(1 << 20))
            comp.close()


def read_mixed(dec: Decompressor) -> bytes:
    """read and readinto in turn, with odd sizes: the restore read-ahead does both."""
    parts: list[bytes] = []
    buf = memoryview(bytearray(3 * 65536 + 7))
    turn = 0
    while True:
        if turn % 3 == 0:
            piece = dec.read(512)
        else:
            n = dec.readinto(buf[: 4096 * turn % len(buf) or 1])
            piece = bytes(buf[:n])
        if not piece:
            return b"".join(parts)
        parts.append(piece)
        turn += 1


def test_readinto_gives_the_same_bytes(archive: Path, compression: Compression, sample: bytes) -> None:
    with open(archive, "rb") as src, open_decompressor(src) as dec:
        assert read_mixed(dec) == sample
        assert dec.at_eof
    with pipe_of(archive.read_bytes()) as stream, open_decompressor(stream) as dec:
        assert read_mixed(dec) == sample


@pytest.mark.parametrize("damage", ["flipped", "half", "last-bytes-cut"])
@pytest.mark.parametrize("compression", PACKED, ids=lambda c: c.value)
def test_readinto_reports_damage(tmp_path: Path, compression: Compression, sample: bytes, damage: str) -> None:
    blob = compress_to(tmp_path / "x", compression, [sample]).read_bytes()
    with pytest.raises(CompressError), pipe_of(damaged_versions(blob)[damage]) as stream, \
            open_decompressor(stream) as dec:
        read_mixed(dec)
