"""Fixtures for the NBD endpoint tests: a recording cluster sink and a served export."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpbackup.backup.assembler import ClusterAssembler
from qmpbackup.nbd import Export, NbdServer
from qmpbackup.vma.format import CLUSTER_SIZE
from tests.nbd.file_source import FileSource
from tests.support.qemu import qemu  # noqa: F401  (the QEMU version fixture)


class RecordingSink:
    """A fake VMA writer: keeps every cluster, refuses a cluster twice (as VMA would)."""

    def __init__(self) -> None:
        self.clusters: dict[tuple[int, int], bytes | None] = {}

    def write_cluster(self, dev_id: int, cluster_num: int, data: bytes | memoryview | None) -> None:
        key = (dev_id, cluster_num)
        assert key not in self.clusters, f"cluster {key} emitted twice"
        self.clusters[key] = None if data is None else bytes(data)

    def image(self, dev_id: int, size: int) -> bytes:
        """The device as the archive would restore it."""
        out = bytearray()
        count = (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
        for c in range(count):
            length = min(CLUSTER_SIZE, size - c * CLUSTER_SIZE)
            data = self.clusters[(dev_id, c)]
            if data is None:
                out += bytes(length)
            else:
                assert len(data) == length
                out += data
        return bytes(out)


def assert_same_as_file(sink: RecordingSink, dev_id: int, path: Path, size: int) -> None:
    """Compares the assembled clusters with the raw file read in 64 KiB chunks."""
    count = (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    assert len([k for k in sink.clusters if k[0] == dev_id]) == count
    with open(path, "rb") as f:
        for c in range(count):
            expect = f.read(CLUSTER_SIZE)
            got = sink.clusters[(dev_id, c)]
            if got is None:
                assert expect == bytes(len(expect)), f"cluster {c}: expected data, got zero"
            else:
                assert got == expect, f"cluster {c} differs"


@dataclass
class Served:
    server: NbdServer
    sink: RecordingSink
    assemblers: dict[str, ClusterAssembler]

    @property
    def socket(self) -> str:
        return str(self.server.path)

    def url(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.server.path}"


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


ServeFactory = Callable[[dict[str, int]], contextlib.AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(sockdir: Path) -> ServeFactory:
    """Factory: ``async with serve({"name": size, ...}) as served:``, one device per export."""

    @contextlib.asynccontextmanager
    async def factory(exports: dict[str, int]) -> AsyncIterator[Served]:
        sink = RecordingSink()
        assemblers = {}
        server_exports = []
        for dev_id, (name, size) in enumerate(exports.items(), start=1):
            asm = ClusterAssembler(sink, dev_id, size, name=name)
            assemblers[name] = asm
            server_exports.append(Export(name, size, asm))
        async with NbdServer(sockdir / "nbd.sock", server_exports, name="test-nbd") as server:
            yield Served(server, sink, assemblers)

    return factory


ReadServeFactory = Callable[[dict[str, Path]], contextlib.AbstractAsyncContextManager[NbdServer]]


@pytest.fixture
def serve_files(sockdir: Path) -> ReadServeFactory:
    """Factory: ``async with serve_files({"name": raw_path, ...}) as server:``, read-only exports."""

    @contextlib.asynccontextmanager
    async def factory(files: dict[str, Path]) -> AsyncIterator[NbdServer]:
        sources = {name: FileSource(path) for name, path in files.items()}
        try:
            exports = [Export.read_only(name, src) for name, src in sources.items()]
            async with NbdServer(sockdir / "nbd.sock", exports, name="test-export",
                                 keep_serving=True) as server:
                yield server
        finally:
            for src in sources.values():
                src.close()

    return factory


def url(server: NbdServer, name: str) -> str:
    return f"nbd+unix:///{name}?socket={server.path}"
