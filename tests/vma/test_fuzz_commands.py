"""Hostile archives through every command that reads one (#17): ours errors only, bounded memory, nothing outside.

Archives are generated from hostile parts (names with control characters, ``/``, ``..``, bytes
that are not UTF-8, repeated or empty; sizes of 0 up to 2^64-512; config pointers and blobs;
extents whose slots name any device, cluster and mask) or mutated from a sound one (header
fields, device table, config blobs, extent headers, slots, payload, truncation), then stored
plain or zstd-compressed (and sometimes damaged after compression). Each one goes through
``vma list``, ``vma verify``, ``verify --checksums``, ``vma extract`` and ``restore`` run
in-process by the CLI's own ``main``, which turns any exception that is not ours into "internal
error". The test asserts that none is, that every stderr line is one log record (a name cannot
forge a line), that nothing appears outside the extract target, the restore's image folder and
its guest definition (and nothing at all after a failure), that the temporary folder stays
empty, and that the process's memory stays bounded.

``QMPBACKUP_FUZZ_EXAMPLES`` raises the example count for a longer campaign.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpbackup.cli.main import main
from qmpbackup.vma import format as fmt
from qmpbackup.vma.header import encode_header
from tests.vma import archive_builder
from tests.vma.archive_builder import (
    TEST_CTIME,
    TEST_UUID,
    RawExtent,
    disk_image,
    extent_offsets,
    write_archive,
)

EXAMPLES = int(os.environ.get("QMPBACKUP_FUZZ_EXAMPLES", "25"))
RSS_BOUND = 300 * 1024 * 1024  # resident bytes an archive may add, all five commands run
_PREFIXES = ("INFO: ", "WARN: ", "ERROR: ")

NAMES = st.sampled_from([
    b"drive-scsi0", b"drive-scsi1", b"qemu-server.conf", b"", b"a\nINFO: restored VM 100: /x", b"../escape",
    b"/tmp/abs", b"..", b".", b"dr\xffive", b"\x1b[2J", b"disk-drive-scsi0.raw", b"x" * 300, b"vmstate",
    b"line\r\nbreak", b"\xe2\x80\xa8sep", b"tab\tname",
])
SIZES = st.sampled_from([0, 1, 511, 512, 4096 + 512, fmt.CLUSTER_SIZE, 3 * fmt.CLUSTER_SIZE + 4096,
                         (16 << 40) - fmt.CLUSTER_SIZE, 1 << 48, (1 << 48) + 512, 1 << 63, (1 << 64) - 512])
CLUSTERS = st.one_of(st.integers(0, 4), st.sampled_from([1 << 16, 1 << 31, (1 << 32) - 1]))
MASKS = st.sampled_from([0, 1, 0x8000, 0x00FF, fmt.FULL_MASK])
CONFIG = (b"memory: 512\nscsi0: local:100/vm-100-disk-0.raw,size=1G\n#qmdump#map:scsi0:drive-scsi0::raw:\n"
          b"scsi1: local:100/vm-100-disk-1.raw,size=1G\n#qmdump#map:scsi1:drive-scsi1::raw:\n")
CONFIG_DATA = st.one_of(st.just(CONFIG), st.binary(max_size=64), st.just(b"memory: 5\xff12\n"))


@st.composite
def generated(draw: st.DrawFn) -> bytes:
    """An archive built from hostile parts: the header is well formed, everything in it is not."""
    devices = draw(st.lists(st.tuples(NAMES, SIZES), min_size=1, max_size=3))
    configs = draw(st.lists(st.tuples(NAMES, CONFIG_DATA), max_size=3))
    if draw(st.booleans()):
        configs.insert(0, (b"qemu-server.conf", CONFIG))
    header = encode_header(TEST_UUID, TEST_CTIME, configs, devices)
    extents = []
    for _ in range(draw(st.integers(0, 3))):
        slots = draw(st.lists(st.tuples(MASKS, st.integers(0, 4), CLUSTERS), max_size=6))
        blocks = sum(mask.bit_count() for mask, _dev, _cluster in slots)
        blocks = draw(st.sampled_from([blocks, blocks, max(blocks - 1, 0), blocks + 1]))
        payload = random.Random(draw(st.integers(0, 3))).randbytes(blocks * fmt.BLOCK_SIZE)
        extents.append(RawExtent(slots=[fmt.blockinfo(m, d, c) for m, d, c in slots], payload=payload))
    return header + b"".join(e.encode() for e in extents)


BASE = write_archive(
    [("drive-scsi0", disk_image(3 * fmt.CLUSTER_SIZE + 4096, [0, 1, 2, 3], 1)),
     ("drive-scsi1", disk_image(2048, [2], 2))],
    configs=[("qemu-server.conf", CONFIG), ("qemu-server.fw", b"[OPTIONS]\n")],
)
OFFSETS = extent_offsets(BASE)
_HEADER_FIELDS = [4, 48, 52, 56, fmt.CONFIG_NAMES_OFFSET, fmt.CONFIG_DATA_OFFSET, fmt.CONFIG_NAMES_OFFSET + 4,
                  fmt.CONFIG_DATA_OFFSET + 4, fmt.DEV_INFO_OFFSET + 32, fmt.DEV_INFO_OFFSET + 64,
                  fmt.DEV_INFO_OFFSET + 96]
_SIZE_FIELDS = [fmt.DEV_INFO_OFFSET + 32 * d + 8 for d in (1, 2, 3)]
_BLOBS = (fmt.HEADER_FIXED_SIZE, OFFSETS[0])

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(BASE) - 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(*_BLOBS), st.sampled_from([0, 10, 13, 27, 47, 0xFF])),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("field"), st.sampled_from(_HEADER_FIELDS), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("size"), st.sampled_from(_SIZE_FIELDS), SIZES),
    st.tuples(st.just("slot"), st.integers(0, 58), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("count"), st.integers(0, len(OFFSETS) - 1), st.integers(0, 65535)),
)


def mutate(ops: list[tuple[str, int, object]], rehash: bool) -> bytes:
    return archive_builder.mutate(BASE, OFFSETS, ops, rehash)


@dataclass(frozen=True)
class Stored:
    """How an archive is stored: plain, zstd, or zstd with one byte changed after compression."""

    zstd: bool
    damage: int | None

    def apply(self, data: bytes) -> bytes:
        if not self.zstd:
            return data
        out = bytearray(zstandard.ZstdCompressor(level=1).compress(data))
        if self.damage is not None and out:
            out[self.damage % len(out)] ^= 0x10
        return bytes(out)


storage = st.builds(Stored, st.booleans(), st.one_of(st.none(), st.none(), st.integers(0, 1 << 20)))


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.BytesIO, io.BytesIO]]:
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    wrappers = [io.TextIOWrapper(buf, encoding="utf-8", write_through=True) for buf in (out, err)]
    sys.stdout, sys.stderr = wrappers
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved
        for wrapper in wrappers:
            wrapper.flush()
            wrapper.detach()  # the buffers stay open for the caller


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_commands(data: bytes) -> list[tuple[str, int]]:
    """Every reading command on one archive; returns (command, exit code) and asserts the rules."""
    sandbox = Path(tempfile.mkdtemp(prefix="qmpbackup-fuzz-"))
    try:
        archive = sandbox / "archive.vma"
        archive.write_bytes(data)
        config, images, tmp = sandbox / "config", sandbox / "images", sandbox / "tmp"
        for folder in (config, images, tmp):
            folder.mkdir()
        before = _tree(sandbox)
        commands = {
            "list": ["vma", "list", str(archive)],
            "vma-verify": ["vma", "verify", "-v", str(archive)],
            "checksums": ["verify", "--checksums", str(archive)],
            "extract": ["vma", "extract", str(archive), str(sandbox / "target")],
            "restore": ["restore", str(archive), "100", "--target-dir", str(images), "--format", "raw"],
        }
        results = []
        saved_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = None
        try:
            for name, argv in commands.items():
                with _captured() as (out, err):
                    code = main(["--config-dir", str(config), *argv])
                lines = err.getvalue().decode("utf-8", errors="replace").splitlines()
                assert not any("internal error" in line or "Traceback" in line for line in lines), (name, lines)
                assert all(line.startswith(_PREFIXES) for line in lines), (name, lines)
                assert code in (0, 1, 2), (name, code, lines)
                if code and name != "list":
                    assert lines and lines[-1].startswith("ERROR: "), (name, lines)
                if name == "checksums" and code == 0:
                    assert all(len(line.split(b"  ", 1)[0]) == 64 for line in out.getvalue().splitlines())
                results.append((name, code))
                new = _tree(sandbox) - before
                allowed = {"extract": "target", "restore": "images"}.get(name) if code == 0 else None
                stray = {p for p in new if allowed is None or not (p == allowed or p.startswith(allowed + "/"))}
                stray -= {"config/guests"}  # the guest definitions' folder (restore takes its lock there)
                if name == "restore" and code == 0:
                    stray -= {"config/guests/100.conf"}
                assert not stray, (name, code, sorted(stray))
                assert not os.listdir(tmp), (name, os.listdir(tmp))
                for made in new:  # the next command starts from the same state
                    path = sandbox / made
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    elif path.exists() or path.is_symlink():
                        path.unlink()
        finally:
            if saved_tmp is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_tmp
            tempfile.tempdir = None
        return results
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)


@pytest.fixture
def rss_before() -> Iterator[int]:
    # against the process's own start: in the whole suite pytest itself holds a few hundred MiB
    before = psutil.Process().memory_info().rss
    yield before
    assert psutil.Process().memory_info().rss - before < RSS_BOUND


def test_the_base_archive_passes_everything(rss_before: int) -> None:
    assert run_commands(BASE) == [("list", 0), ("vma-verify", 0), ("checksums", 0), ("extract", 0), ("restore", 0)]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
@given(generated(), storage)
def test_generated_archives(rss_before: int, data: bytes, stored: Stored) -> None:
    run_commands(stored.apply(data))
    assert psutil.Process().memory_info().rss - rss_before < RSS_BOUND


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans(), storage)
def test_mutated_archives(rss_before: int, ops: list[tuple[str, int, object]], rehash: bool, stored: Stored) -> None:
    run_commands(stored.apply(mutate(ops, rehash)))
    assert psutil.Process().memory_info().rss - rss_before < RSS_BOUND
