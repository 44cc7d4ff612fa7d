"""A paused, guest-less QEMU (``-machine none``) with source block nodes, driven through qemu.qmp (test helper)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from qemu.qmp import QMPClient

from tests.support.qemu import QemuBinaries


@contextlib.asynccontextmanager
async def paused_qemu(qemu: QemuBinaries, rundir: Path,
                      sources: dict[str, tuple[Path, str]]) -> AsyncIterator[QMPClient]:
    """QEMU with ``-S -machine none`` and a format node per source: node name → (path, fmt)."""
    qmp_path = rundir / "qmp.sock"
    args = [str(qemu.system), "-S", "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", "none", "-accel", "tcg",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    for node, (path, fmt) in sources.items():
        args += ["-blockdev", f'{{"driver":"file","filename":"{path}","node-name":"{node}-file"}}',
                 "-blockdev", f'{{"driver":"{fmt}","file":"{node}-file","node-name":"{node}"}}']
    stderr_path = rundir / "qemu.stderr"  # a file, not a pipe nobody drains
    with open(stderr_path, "wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    qmp = QMPClient("test-vm")
    try:
        async with asyncio.timeout(20):
            while True:
                if proc.returncode is not None:
                    err = stderr_path.read_text(errors="replace")
                    raise AssertionError(f"QEMU exited early: {err}")
                if qmp_path.exists():
                    try:
                        await qmp.connect(str(qmp_path))
                        break
                    except Exception:  # noqa: BLE001 - socket not ready yet
                        pass
                await asyncio.sleep(0.05)
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await qmp.execute("quit")
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def backup_to_nbd(qmp: QMPClient, node: str, socket: str, export: str, *,
                        job: str = "job0", timeout: float = 60,
                        x_perf: dict[str, int] | None = None) -> dict[str, Any]:
    """blockdev-add nbd target, blockdev-backup sync=full, wait, blockdev-del; the event data."""
    target = f"{job}-target"
    await qmp.execute("blockdev-add", {"driver": "nbd", "node-name": target,
                                       "server": {"type": "unix", "path": socket},
                                       "export": export})
    try:
        args: dict[str, Any] = {"job-id": job, "device": node, "target": target, "sync": "full"}
        if x_perf:
            args["x-perf"] = x_perf
        with qmp.listener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")) as listener:
            await qmp.execute("blockdev-backup", args)
            async with asyncio.timeout(timeout):
                while True:
                    event = await listener.get()
                    event_data = cast(dict[str, Any], event["data"])
                    if event_data["device"] == job:
                        break
    finally:
        await qmp.execute("blockdev-del", {"node-name": target})
    data = dict(event_data)
    data["event"] = event["event"]
    return data
