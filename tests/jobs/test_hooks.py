"""Hook scripts run for real: arguments, the exact environment, output, exit status, timeout."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from qmpbackup.errors import UsageError
from qmpbackup.jobs.hooks import GuestInfo, HookError, HookRunner

SCRIPT = """#!/bin/sh
echo "$@" >> {out}/calls
/usr/bin/tr '\\0' '\\n' < /proc/$$/environ | /usr/bin/sort > {out}/env-$1
echo "hook says $1"
echo "to stderr" >&2
case "$1" in backup-end) exit 3;; esac
exit 0
"""


def make_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_phases_arguments_environment(tmp_path: Path) -> None:
    script = make_script(tmp_path / "hook.sh", SCRIPT.format(out=tmp_path))
    lines: list[str] = []
    runner = HookRunner(script, storeid="local", dumpdir=Path("/var/lib/vz/dump"), on_output=lines.append)
    await runner.job_phase("job-init", explicit_dumpdir=False)
    await runner.job_phase("job-start")
    guest = GuestInfo(vmid=100, mode="snapshot", hostname="web01",
                      target=Path("/var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.vma.zst"),
                      logfile=Path("/var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.log"))
    await runner.guest_phase("backup-start", guest)
    with pytest.raises(HookError) as err:
        await runner.guest_phase("backup-end", guest)
    assert err.value.phase == "backup-end" and err.value.returncode == 3
    assert "exit code 3" in str(err.value)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["job-init", "job-start", "backup-start snapshot 100", "backup-end snapshot 100"]
    assert (tmp_path / "env-job-init").read_text().splitlines() == ["STOREID=local"]
    assert (tmp_path / "env-job-start").read_text().splitlines() == [
        "DUMPDIR=/var/lib/vz/dump", "STOREID=local"]
    assert (tmp_path / "env-backup-start").read_text().splitlines() == [
        "DUMPDIR=/var/lib/vz/dump",
        "HOSTNAME=web01",
        "LOGFILE=/var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.log",
        "STOREID=local",
        "TARGET=/var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.vma.zst",
        "VMTYPE=qemu",
    ]
    assert "hook says job-init" in lines and "to stderr" in lines


async def test_timeout_kills(tmp_path: Path) -> None:
    script = make_script(tmp_path / "slow.sh", "#!/bin/sh\necho started\nexec /bin/sleep 30\n")
    runner = HookRunner(script, timeout_s=0.5, on_output=lambda line: None)
    with pytest.raises(HookError, match="timed out"):
        await runner.job_phase("job-end")


async def test_cancel_kills(tmp_path: Path) -> None:
    script = make_script(
        tmp_path / "slow.sh", "#!/bin/sh\necho $$ > " + str(tmp_path / "pid") + "\nexec /bin/sleep 30\n"
    )
    runner = HookRunner(script, on_output=lambda line: None)
    task = asyncio.create_task(runner.job_phase("job-end"))
    for _ in range(100):
        if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_script_checks(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        HookRunner(tmp_path / "nope")
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="not executable"):
        HookRunner(plain)
