"""docs/format.md's worked example (F9): the reader reads it, and ``vma create`` still writes it."""

from __future__ import annotations

import io
import re
from pathlib import Path

from qmpbackup.cli.main import main
from qmpbackup.vma import VmaReader

DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
CONFIG = b"name: demo\nscsi0: local:vm-100-disk-0,size=8K\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n"
# Fields that differ from run to run: header uuid, ctime, MD5; the extent's uuid and MD5.
VARYING = [(8, 48), (0x3208, 0x3228)]


def example_bytes() -> bytes:
    """The archive the ``xxd -a`` dump after ``<!-- example: demo.vma -->`` shows."""
    text = DOC.read_text()
    block = text.split("<!-- example: demo.vma -->\n```text\n", 1)[1].split("\n```", 1)[0]
    out = bytearray()
    for line in block.splitlines():
        if line == "*":
            continue  # zero lines: the gap up to the next address stays zero
        m = re.fullmatch(r"([0-9a-f]{8}): ((?:[0-9a-f]{4} ?){1,8})  .*", line)
        assert m, line
        offset, data = int(m.group(1), 16), bytes.fromhex(m.group(2).replace(" ", ""))
        out.extend(bytes(offset - len(out)))
        out[offset:offset + len(data)] = data
    return bytes(out)


def test_the_reader_reads_the_example() -> None:
    archive = example_bytes()
    assert len(archive) == 17408
    reader = VmaReader(io.BytesIO(archive))
    assert reader.configs == {"qemu-server.conf": CONFIG}
    assert [(d.dev_id, d.name, d.size) for d in reader.devices.values()] == [(1, "drive-scsi0", 8192)]
    clusters = list(reader.clusters())  # every rule of section R, coverage included
    assert [(c.dev_id, c.cluster_num, c.mask) for c in clusters] == [(1, 0, 0x0001)]
    assert bytes(clusters[0].data or b"")[:4096] == b"hello, VMA\n".ljust(4096, b"\0")


def test_vma_create_writes_the_example(tmp_path: Path) -> None:
    (tmp_path / "qemu-server.conf").write_bytes(CONFIG)
    disk = bytearray(8192)
    disk[:11] = b"hello, VMA\n"
    (tmp_path / "disk.raw").write_bytes(disk)
    out = tmp_path / "demo.vma"
    assert main(["vma", "create", str(out), "-c", str(tmp_path / "qemu-server.conf"),
                 "-d", f"format=raw:drive-scsi0={tmp_path / 'disk.raw'}"]) == 0
    ours, doc = bytearray(out.read_bytes()), bytearray(example_bytes())
    for start, end in VARYING:
        ours[start:end] = doc[start:end] = bytes(end - start)
    assert ours == doc
