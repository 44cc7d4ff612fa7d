"""The fleecing tuning benchmark: ``python -m fleecing.bench [--qemu BIN]... [--size-mib N]``.

For each QEMU it runs, on a fresh paused VM with one random-filled disk (scsi-hd):

* ``no backup``: the guest write loop alone (the baseline);
* ``no fleecing``: a push backup reading the disk directly, target throttled to 10 MiB/s;
* ``qcow2 64k``, ``qcow2 1M``, ``raw``: the same backup reading a fleecing snapshot
  (the library's graph, the engine's block-job layer, space reclaim as the QEMU allows).

The "guest" is QEMU's own ``qemu-io`` on the device's BlockBackend (through HMP): random
4 KiB ``aio_write``s, one submitted every 10 ms. Latency is qemu-io's own measurement of each
write (it prints ops/sec per command to QEMU's stdout), not the QMP round trip.
``overwritten`` counts the copy-before-write units the guest wrote before the backup had
sent them (each is copied at most once); ``peak`` is the fleecing file's largest
allocation (``du``), sampled every 50 ms. Prints a table and a recommendation.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleecing.drives import Fleecing
from fleecing.probe import allocated_bytes
from fleecing.storage import fleecing_storage, plan_fleecing
from qmpbackup.backup.blockjobs import attach_targets, detach_targets, plan_block_jobs, run_block_jobs
from qmpbackup.jobs.storage_cfg import parse_storage_cfg
from qmpbackup.recovery.journal import Journal
from qmpbackup.nbd import Export, NbdServer
from qmpbackup.qemu.capabilities import probe
from qmpbackup.qemu.discovery import discover_disks
from qmpbackup.qemu.session import QmpSession
from qmpbackup.throttle import TokenBucket

MiB = 1 << 20
VMID = 100
_OPS = re.compile(rb"wrote (\d+)/\d+ bytes at offset (\d+)\n[^\n]*?and ([0-9.]+) ops/sec")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    backup: bool
    fleecing: str | None = None  # qcow2 | raw
    cluster: int = 64 << 10


SCENARIOS = (
    Scenario("no backup", False),
    Scenario("no fleecing", True),
    Scenario("qcow2 64k", True, "qcow2", 64 << 10),
    Scenario("qcow2 1M", True, "qcow2", 1 << 20),
    Scenario("raw", True, "raw", 64 << 10),
)


@dataclass
class Result:
    qemu: str
    scenario: str
    writes: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    throughput_kib_s: float = 0.0
    backup_s: float = 0.0
    drain_s: float = 0.0  # waiting for the last writes after the loop stopped
    peak_fleece: int = 0
    overwritten: int = 0
    reclaim: str = ""
    notes: list[str] = field(default_factory=list)


class ThrottledTarget:
    """Our NBD endpoint's consumer: drops the data at ``rate`` bytes/s, remembers when each range came."""

    def __init__(self, rate: float) -> None:
        self.bucket = TokenBucket(rate)
        self.received: list[tuple[int, int, float]] = []

    async def _take(self, offset: int, length: int) -> None:
        await self.bucket.aconsume(length)
        self.received.append((offset, length, time.monotonic()))

    async def write(self, offset: int, data: memoryview, /) -> None:
        await self._take(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, /) -> None:
        await self._take(offset, length)

    async def trim(self, offset: int, length: int, /) -> None:
        pass

    async def flush(self) -> None:
        pass


def _qemu_binaries(given: Sequence[str]) -> list[Path]:
    if given:
        return [Path(g) for g in given]
    found = [Path(p) for p in [shutil.which("qemu-system-x86_64")] if p]
    cache = Path(__file__).resolve().parents[1] / "cache"
    found += sorted(cache.glob("qemu-*/bin/qemu-system-x86_64"))
    return found


def _version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


class Vm:
    """A paused QEMU with one scsi-hd disk, its stdout in a file (where qemu-io reports)."""

    def __init__(self, binary: Path, workdir: Path, disk: Path) -> None:
        self.qmp = workdir / "qmp.sock"
        self.out_path = workdir / "qemu.out"
        argv = [str(binary), "-S", "-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
                "-machine", "q35", "-m", "64", "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-blockdev", json.dumps({"driver": "file", "filename": str(disk), "node-name": "disk0-file",
                                         "discard": "unmap"}),
                "-blockdev", json.dumps({"driver": "raw", "file": "disk0-file", "node-name": "disk0"}),
                "-device", "virtio-scsi-pci,id=scsihw0", "-device", "scsi-hd,bus=scsihw0.0,drive=disk0,id=scsi0"]
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)

    async def wait_ready(self) -> None:
        async with asyncio.timeout(20):
            while not self._greets():
                if self.proc.poll() is not None:
                    raise RuntimeError(self.out_path.read_text(errors="replace"))
                await asyncio.sleep(0.02)

    def _greets(self) -> bool:
        """QEMU greets once it is set up (a probe connection, closed at once, frees the monitor)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.qmp))
                return s.recv(7).startswith(b'{"QMP"')
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.out.close()


async def _writer(session: QmpSession, qdev: str, size: int, stop: asyncio.Event, log: list[tuple[float, int]],
                  interval: float, seed: int) -> float:
    """Random 4 KiB writes through the device, one submitted every ``interval`` seconds, like a
    guest's queue: ``aio_write`` returns at once (a synchronous HMP write would block QEMU's
    main loop, QMP included, while it waits). Returns how long the last writes took to finish."""
    rnd = random.Random(seed)
    while not stop.is_set():
        started = time.monotonic()
        offset = rnd.randrange(size // 4096) * 4096
        log.append((started, offset))
        await session.qemu_io(qdev, f"aio_write -P 0x5c {offset} 4096", timeout=120)
        rest = interval - (time.monotonic() - started)
        if rest > 0:
            await asyncio.sleep(rest)
    started = time.monotonic()
    await session.qemu_io(qdev, "aio_flush", timeout=600)
    return time.monotonic() - started


def latencies_ms(out: bytes) -> list[float]:
    """Milliseconds of each write in QEMU's qemu-io output (``... and N ops/sec`` per write).

    Public for tests/fleecing/test_bench_helpers.py: the benchmark itself is a script that
    boots VMs for minutes, so its bookkeeping is tested on its own.
    """
    return [1000.0 / float(ops) for _n, _off, ops in _OPS.findall(out) if float(ops) > 0]


def overwritten_bytes(writes: list[tuple[float, int]], received: list[tuple[int, int, float]], unit: int) -> int:
    """Bytes of copy-before-write units the guest wrote before the backup had sent them.

    Public for the same reason as :func:`latencies_ms` (its tests need no VM).
    """
    first_sent: dict[int, float] = {}
    for offset, length, when in received:
        for u in range(offset // unit, (offset + length - 1) // unit + 1):
            first_sent[u] = min(first_sent.get(u, when), when)
    hit: set[int] = set()
    for when, offset in writes:
        u = offset // unit
        if u not in hit and first_sent.get(u, float("inf")) > when:
            hit.add(u)
    return len(hit) * unit


async def run_scenario(binary: Path, version: str, sc: Scenario, size: int, rate: float, baseline_s: float,
                       workdir: Path, source: Path) -> Result:
    result = Result(version, sc.name)
    disk = workdir / "disk.raw"
    shutil.copyfile(source, disk)
    store = workdir / "store"
    store.mkdir()
    vm = Vm(binary, workdir, disk)
    writes: list[tuple[float, int]] = []
    try:
        await vm.wait_ready()
        async with QmpSession(str(VMID), vm.qmp) as session:
            caps = await probe(session)
            (d,) = await discover_disks(session, str(VMID))
            stop = asyncio.Event()
            if not sc.backup:
                task = asyncio.create_task(_writer(session, d.qdev, size, stop, writes, 0.01, 1))
                await asyncio.sleep(baseline_s)
                stop.set()
                result.drain_s = await task
                result.backup_s = baseline_s
            else:
                result = await _backup(session, caps, d, sc, result, size, rate, workdir, store, stop, writes)
        await asyncio.sleep(0.2)
    finally:
        vm.kill()
    lat = latencies_ms(vm.out_path.read_bytes())
    if lat:
        q = statistics.quantiles(lat, n=100, method="inclusive")
        result.p50_ms, result.p99_ms, result.max_ms = q[49], q[98], max(lat)
    result.writes = len(lat)
    elapsed = result.backup_s + result.drain_s
    result.throughput_kib_s = len(lat) * 4 / elapsed if elapsed else 0.0
    return result


async def _backup(session: QmpSession, caps: Any, d: Any, sc: Scenario, result: Result, size: int, rate: float,
                  workdir: Path, store: Path, stop: asyncio.Event, writes: list[tuple[float, int]]) -> Result:
    journal = Journal.open(workdir / "journal.jsonl")
    target = ThrottledTarget(rate)
    fl: Fleecing | None = None
    peak = 0
    try:
        sources = [(d.key, d.top_node, d.size)]
        extra: dict[str, dict[str, Any]] = {}
        if sc.fleecing:
            cfg = f"dir: fl\n\tpath {store}\n\tcontent images\n\tpreallocation off\n"
            plan = await plan_fleecing(fleecing_storage(parse_storage_cfg(cfg, "bench"), "fl"), [d.size],
                                       cluster_size=sc.cluster)
            plan = dataclasses.replace(plan, format=sc.fleecing)
            fl = Fleecing(session, journal, caps, VMID, [d], plan, rundir=workdir)
            await fl.prepare()
        jobs = plan_block_jobs(VMID, fl.sources() if fl is not None else sources)
        if fl is not None:
            extra = fl.job_extra()
        consumer: Any = fl.consumer(d.key, target) if fl is not None else target
        server = NbdServer(workdir / "nbd.sock", [Export(jobs[0].export, d.size, consumer)], name="bench")
        await server.start()
        try:
            await attach_targets(session, journal, jobs, server.path, caps)
            image = Path(fl.drives[d.key].image.path) if fl is not None else None

            async def sample() -> None:
                nonlocal peak
                while image is not None:
                    peak = max(peak, allocated_bytes(image))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            writer = asyncio.create_task(_writer(session, d.qdev, size, stop, writes, 0.01, 1))
            started = time.monotonic()
            try:
                if fl is not None:
                    await fl.insert()  # the snapshot point (and 7.2's TRIM path), right before the job starts
                await run_block_jobs(session, journal, jobs, caps, job_args=extra)
                result.backup_s = time.monotonic() - started
            finally:
                stop.set()
                result.drain_s = await writer
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            await detach_targets(session, journal, jobs)
        finally:
            await server.close()
        if fl is not None:
            result.peak_fleece = peak
            result.reclaim = ("discard-source" if caps.has_backup_discard_source else
                              "NBD TRIM" if fl.reclaimers else "none")
            unit = max(sc.cluster, 64 << 10) if sc.fleecing == "qcow2" else 64 << 10
            result.overwritten = overwritten_bytes(writes, target.received, unit)
    finally:
        if fl is not None:
            await fl.teardown()
        journal.close()
    return result


def median_result(runs: Sequence[Result]) -> Result:
    """The median of every measured number over repeated runs of one scenario."""
    first = runs[0]
    out = dataclasses.replace(first)
    for f in dataclasses.fields(Result):
        values = [getattr(r, f.name) for r in runs]
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            med = statistics.median(values)
            setattr(out, f.name, type(values[0])(med))
    return out


def _fmt_bytes(n: int) -> str:
    return f"{n / MiB:.1f}"


def table(results: Sequence[Result]) -> str:
    head = (f"{'QEMU':<8} {'scenario':<12} {'writes':>6} {'p50 ms':>8} {'p99 ms':>9} {'max ms':>9} "
            f"{'KiB/s':>7} {'backup s':>8} {'peak MiB':>8} {'overwr MiB':>10} {'peak/ow':>7} reclaim")
    lines = [head, "-" * len(head)]
    for r in results:
        ratio = f"{r.peak_fleece / r.overwritten:.2f}" if r.overwritten else "-"
        fleece = r.scenario not in ("no backup", "no fleecing")
        lines.append(
            f"{r.qemu:<8} {r.scenario:<12} {r.writes:>6} {r.p50_ms:>8.2f} {r.p99_ms:>9.2f} {r.max_ms:>9.1f} "
            f"{r.throughput_kib_s:>7.0f} {r.backup_s:>8.1f} "
            f"{_fmt_bytes(r.peak_fleece) if fleece else '-':>8} {_fmt_bytes(r.overwritten) if fleece else '-':>10} "
            f"{ratio if fleece else '-':>7} {r.reclaim}")
    return "\n".join(lines)


def recommendation(results: Sequence[Result]) -> str:
    out = []
    for version in dict.fromkeys(r.qemu for r in results):
        rs = {r.scenario: r for r in results if r.qemu == version}
        base = rs.get("no backup")
        if base is None or not base.p99_ms:
            continue
        fleeced = [r for r in rs.values() if r.scenario not in ("no backup", "no fleecing") and r.p99_ms]
        ok = [r for r in fleeced if r.p99_ms <= 3 * base.p99_ms and
              (not r.overwritten or r.peak_fleece <= 1.1 * r.overwritten)]
        # among the variants meeting both targets, the least fleecing space (a full storage fails
        # the backup); if none does, the lowest latency
        best = (min(ok, key=lambda r: (r.peak_fleece, r.p99_ms)) if ok
                else min(fleeced, key=lambda r: (r.p99_ms, r.peak_fleece), default=None))
        nofl = rs.get("no fleecing")
        line = f"QEMU {version}: baseline p99 {base.p99_ms:.2f} ms"
        if nofl:
            line += f"; without fleecing p99 {nofl.p99_ms:.0f} ms (x{nofl.p99_ms / base.p99_ms:.0f})"
        if best:
            line += (f"; use fleecing '{best.scenario}' (p99 {best.p99_ms:.2f} ms = x{best.p99_ms / base.p99_ms:.1f},"
                     f" peak {_fmt_bytes(best.peak_fleece)} MiB for {_fmt_bytes(best.overwritten)} MiB overwritten)")
        if fleeced and not ok:
            line += "; NO fleecing variant met both targets (p99 <= 3x baseline, peak <= 1.1x overwritten)"
        out.append(line)
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    results: list[Result] = []
    base = Path(tempfile.mkdtemp(prefix="qb-bench-", dir="/tmp"))
    try:
        source = base / "source.raw"
        with open(source, "wb") as f:
            rnd = random.Random(5)
            for _ in range(args.size_mib):
                f.write(rnd.randbytes(MiB))
        wanted = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
        for binary in _qemu_binaries(args.qemu):
            version = _version(binary)
            runs: dict[str, list[Result]] = {}
            for rep in range(args.repeat):  # round robin: a load spike hits every scenario alike
                for sc in wanted:
                    workdir = base / f"{version}-{sc.name.replace(' ', '_')}-{rep}"
                    workdir.mkdir(mode=0o700)
                    print(f"QEMU {version}: {sc.name} ({rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                    runs.setdefault(sc.name, []).append(await run_scenario(
                        binary, version, sc, args.size_mib * MiB, args.rate_mib * MiB, args.baseline_s, workdir,
                        source))
                    shutil.rmtree(workdir, ignore_errors=True)
            results += [median_result(rs) for rs in runs.values()]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"disk {args.size_mib} MiB random data, target throttled to {args.rate_mib} MiB/s,"
          f" guest: random 4 KiB aio writes, 100/s submitted, through the device;"
          f" median of {args.repeat} run(s); load average {load:.1f} on {os.cpu_count()} CPUs")
    print(table(results))
    print()
    print(recommendation(results))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleecing.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--qemu", action="append", default=[], metavar="BIN",
                   help="qemu-system-x86_64 to test (repeatable; default: the system's and cache/qemu-*)")
    p.add_argument("--size-mib", type=int, default=128, help="disk size (default 128)")
    p.add_argument("--rate-mib", type=float, default=10.0, help="target throttle in MiB/s (default 10)")
    p.add_argument("--baseline-s", type=float, default=5.0, help="length of the no-backup run (default 5)")
    p.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                   help="run only these scenarios (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="runs per scenario, medians reported (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
