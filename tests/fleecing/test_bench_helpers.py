"""The benchmark's bookkeeping (the benchmark itself is a script: python -m fleecing.bench)."""

from __future__ import annotations

from fleecing.bench import Result, latencies_ms, overwritten_bytes, recommendation, table

K = 64 * 1024


def test_overwritten_counts_units_written_before_they_were_sent() -> None:
    received = [(0, 2 * K, 10.0), (2 * K, K, 20.0), (3 * K, K, 30.0)]
    writes = [(5.0, 100), (6.0, 200), (15.0, K + 5), (18.0, 2 * K), (35.0, 3 * K)]
    # unit 0 before sent (once), unit 1 after, unit 2 before, unit 3 after
    assert overwritten_bytes(writes, received, K) == 2 * K


def test_latencies_from_qemu_io_output() -> None:
    out = (b"wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 00.00 sec (39.7 MiB/sec and 10000.0000 ops/sec)\n"
           b"wrote 4096/4096 bytes at offset 4096\n4 KiB, 1 ops; 00.50 sec (8 KiB/sec and 2.0000 ops/sec)\n")
    assert latencies_ms(out) == [0.1, 500.0]


def test_table_and_recommendation() -> None:
    rs = [Result("7.2.22", "no backup", 100, 0.1, 2.0, 3.0, 400, 10),
          Result("7.2.22", "no fleecing", 50, 500, 3000, 3100, 200, 13),
          Result("7.2.22", "qcow2 64k", 100, 0.2, 5.0, 9.0, 400, 13, 0, 4 << 20, 6 << 20, "NBD TRIM")]
    text = table(rs)
    assert "qcow2 64k" in text and "0.67" in text and "NBD TRIM" in text
    rec = recommendation(rs)
    assert "use fleecing 'qcow2 64k'" in rec and "x2.5" in rec and "NO fleecing" not in rec
