"""A backup run's phases, in-process, against a fake QMP peer on a real unix socket.

What is tested here is the run's own logic: the order of its phases and of the features'
hooks, the freeze/pause window around the snapshot point and the block jobs' start, and that
a failure in any phase tears everything down (journal empty, nothing of ours left in the
VM, no ``.dat``, the guest thawed and running) with the first error the one reported. The
real-QEMU tests (tests/integration) show what only QEMU can: the point in time, fleecing's
graph, bitmaps that track writes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fleecing.feature import FleecingFeature
from fleecing.storage import fleecing_storage
from qmpbackup.backup.datapath import ArchiveDataPath
from qmpbackup.backup.features import Feature, NoFeature, RunContext
from qmpbackup.backup.incremental_feature import IncrementalFeature
from qmpbackup.backup.request import GuestRequest
from qmpbackup.backup.run import GuestRun, RunState
from qmpbackup.errors import QmpBackupError
from qmpbackup.jobs.storage_cfg import parse_storage_cfg
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.nbd.export import ExportConsumer
from qmpbackup.qemu import naming
from qmpbackup.recovery.state import journal_path
from qmpbackup.vma import VmaReader
from qmpbackup.vma.archive_io import open_archive
from tests.backup.fake_qemu import FakeDisk, FakeQemu, disk_content
from tests.guest_agent.fake_agent import FakeAgent
from tests.support.qemu import available_versions

MiB = 1 << 20
VMID = 100
DONE = [RunState.NEW, RunState.PREPARED, RunState.ATTACHED, RunState.STARTED, RunState.TRANSFERRED,
        RunState.FINISHED, RunState.TORN_DOWN]


class Recorder(NoFeature):
    """A feature that writes down each call (and what the VM looked like then), and can fail."""

    def __init__(self, qemu: FakeQemu, agent: FakeAgent | None = None, *, fail_at: str | None = None,
                 fail_teardown: bool = False) -> None:
        self.qemu, self.agent = qemu, agent
        self.fail_at, self.fail_teardown = fail_at, fail_teardown
        self.calls: list[str] = []
        self.seen: dict[str, Any] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_at:
            raise QmpBackupError(f"recorder fails in {name}")

    async def attach(self, run: RunContext) -> Mapping[str, str]:
        self._call("attach")
        return {}

    def actions(self) -> list[dict[str, Any]]:
        self._call("actions")
        return []

    def job_args(self) -> Mapping[str, Mapping[str, Any]]:
        self._call("job_args")
        return {}

    async def at_snapshot_point(self, run: RunContext) -> None:
        self.seen["status"] = self.qemu.status
        self.seen["frozen"] = self.agent.frozen if self.agent else None
        self.seen["jobs"] = list(self.qemu.jobs)
        self._call("at_snapshot_point")

    def wrap_consumer(self, key: str, consumer: ExportConsumer) -> ExportConsumer:
        self._call("wrap_consumer")
        return consumer

    async def complete_archive(self, run: RunContext, archive: ArchiveDataPath) -> int:
        self._call("complete_archive")
        return 0

    def closing_lines(self, received: Mapping[str, int]) -> list[str]:
        self._call("closing_lines")
        return []

    async def commit(self, run: RunContext) -> list[str]:
        self._call("commit")
        return []

    async def teardown(self) -> None:
        self.calls.append("teardown")
        if self.fail_teardown:
            raise QmpBackupError("recorder teardown failed")


@pytest.fixture
async def qemu(short_dir: Path) -> AsyncIterator[FakeQemu]:
    async with FakeQemu(short_dir / "qmp.sock", [FakeDisk("scsi0", 3 * MiB), FakeDisk("virtio1", 2 * MiB)]) as fake:
        yield fake


def request(tmp_path: Path, qemu: FakeQemu, features: tuple[Feature, ...], *, mode: str = "snapshot",
            qga: Path | None = None) -> GuestRequest:
    return GuestRequest(vmid=VMID, options=VzdumpOptions(mode=mode), dump_dir=tmp_path / "dump", storeid=None,
                        definition=None, qmp=qemu.path, qga=qga, state_dir=tmp_path / "state",
                        features=features)


def assert_nothing_left(tmp_path: Path, qemu: FakeQemu, run: GuestRun, *, bitmaps: bool = False) -> None:
    left = [x for x in qemu.ours() if bitmaps or not x.startswith("bitmap ")]
    assert left == [], left
    assert not journal_path(tmp_path / "state", VMID).exists(), "journal entries left pending"
    assert not list((tmp_path / "dump").glob("*.dat"))
    assert run.run is None or not run.run.rundir.exists()


async def test_phases_run_in_order_and_the_archive_holds_the_disks(tmp_path: Path, qemu: FakeQemu) -> None:
    recorder = Recorder(qemu)
    run = GuestRun(request(tmp_path, qemu, (recorder, IncrementalFeature(enabled=True))))
    result = await run.backup()
    assert result.status == "ok", result.error
    assert run.history == DONE and run.failed_in is None
    assert recorder.calls == ["attach", "wrap_consumer", "wrap_consumer", "at_snapshot_point", "actions", "job_args",
                              "complete_archive", "closing_lines", "commit", "teardown"]
    assert recorder.seen == {"status": "running", "frozen": None, "jobs": []}
    commands = qemu.commands()
    assert commands.index("transaction") > max(i for i, c in enumerate(commands) if c == "blockdev-add")
    assert commands.index("blockdev-del") > max(i for i, c in enumerate(commands) if c == "job-dismiss")
    transaction = dict(qemu.log)["transaction"]["actions"]
    assert [a["type"] for a in transaction] == ["block-dirty-bitmap-add"] * 2 + ["blockdev-backup"] * 2
    assert_nothing_left(tmp_path, qemu, run)
    assert qemu.ours() == [f"bitmap {a['data']['name']}" for a in transaction[:2]]  # the next run's base
    assert result.archive is not None and result.bytes_read == 5 * MiB
    assert archive_images(Path(result.archive)) == {"drive-scsi0": disk_content(3 * MiB),
                                                    "drive-virtio1": disk_content(2 * MiB)}


def archive_images(path: Path) -> dict[str, bytes]:
    """Device name -> its bytes, read back with the validating reader."""
    with open_archive(str(path)) as source:
        reader = VmaReader(source)
        images = {dev_id: bytearray(dev.size) for dev_id, dev in reader.devices.items()}
        for cluster in reader.clusters():
            if cluster.data is not None:
                image = images[cluster.dev_id]
                start = cluster.cluster_num * 65536
                image[start:start + 65536] = cluster.data[:len(image) - start]
        return {reader.devices[dev_id].name: bytes(image) for dev_id, image in images.items()}


async def test_the_window_holds_the_snapshot_point_and_the_start(tmp_path: Path, qemu: FakeQemu,
                                                                 fake_agent: FakeAgent) -> None:
    recorder = Recorder(qemu, fake_agent)
    run = GuestRun(request(tmp_path, qemu, (recorder,), qga=Path(fake_agent.path)))
    result = await run.backup()
    assert result.status == "ok", result.error
    assert recorder.seen["frozen"] is True, "the snapshot point is inside the freeze"
    assert not fake_agent.frozen and result.freeze_window_s is not None
    freeze, thaw = fake_agent.received.index("guest-fsfreeze-freeze"), fake_agent.received.index("guest-fsfreeze-thaw")
    assert freeze < thaw


async def test_suspend_mode_pauses_around_the_snapshot_point(tmp_path: Path, qemu: FakeQemu) -> None:
    recorder = Recorder(qemu)
    result = await GuestRun(request(tmp_path, qemu, (recorder,), mode="suspend")).backup()
    assert result.status == "ok", result.error
    assert recorder.seen["status"] == "paused"
    assert qemu.status == "running"
    commands = qemu.commands()
    assert commands.index("stop") < commands.index("transaction") < commands.index("cont")


FAILURES: dict[str, tuple[dict[str, Any], RunState, str]] = {
    # phase: (how, the state the run had reached, text of the reported error)
    "prepare": ({"fail": {"query-block": "no block devices today"}}, RunState.NEW, "no block devices today"),
    "attach (feature)": ({"fail_at": "attach"}, RunState.PREPARED, "recorder fails in attach"),
    "attach (targets)": ({"fail": {"blockdev-add": "nbd: connection refused"}}, RunState.PREPARED,
                         "connection refused"),
    "window": ({"fail_at": "at_snapshot_point"}, RunState.ATTACHED, "recorder fails in at_snapshot_point"),
    "start": ({"fail": {"transaction": "transaction refused"}}, RunState.ATTACHED, "transaction refused"),
    "transfer": ({"job_error": "Input/output error"}, RunState.STARTED, "Input/output error"),
    "finish": ({"fail_at": "complete_archive"}, RunState.TRANSFERRED, "recorder fails in complete_archive"),
}


@pytest.mark.parametrize("mode", ["snapshot", "suspend"])
@pytest.mark.parametrize("phase", list(FAILURES))
async def test_a_failure_in_any_phase_tears_everything_down(tmp_path: Path, qemu: FakeQemu, fake_agent: FakeAgent,
                                                            phase: str, mode: str) -> None:
    how, reached, text = FAILURES[phase]
    qemu.fail.update(how.get("fail", {}))
    qemu.job_error = how.get("job_error")
    recorder = Recorder(qemu, fake_agent, fail_at=how.get("fail_at"))
    run = GuestRun(request(tmp_path, qemu, (recorder, IncrementalFeature(enabled=True)), mode=mode,
                           qga=Path(fake_agent.path)))
    result = await run.backup()
    assert result.status == "error" and result.error is not None and text in result.error
    assert run.failed_in is reached
    assert run.history == DONE[:DONE.index(reached) + 1] + [RunState.FAILED, RunState.TORN_DOWN]
    assert ("teardown" in recorder.calls) == (reached is not RunState.NEW)
    assert_nothing_left(tmp_path, qemu, run, bitmaps=True)
    assert not fake_agent.frozen
    assert not list((tmp_path / "dump").glob("*.vma"))


async def test_a_target_node_left_by_an_earlier_run_is_refused_and_never_deleted(tmp_path: Path,
                                                                                qemu: FakeQemu) -> None:
    """A node under a target's name (an earlier run's, its journal lost) fails the run before anything is
    recorded for it, with a line that names the cleanup: recorded, the run's replay would delete it."""
    leftover = naming.node_name(VMID, "scsi0", naming.ROLE_TARGET_DATA)
    qemu.nodes[leftover] = {"drv": "nbd", "size": 3 * MiB}
    run = GuestRun(request(tmp_path, qemu, (Recorder(qemu),)))
    result = await run.backup()
    assert result.status == "error" and result.error is not None
    assert f"node {leftover} already exists" in result.error and f"qmpbackup cleanup {VMID}" in result.error
    assert run.failed_in is RunState.PREPARED
    assert "blockdev-add" not in qemu.commands()
    assert qemu.ours() == [leftover], "not ours to delete: cleanup's by-name pass removes it"
    assert not journal_path(tmp_path / "state", VMID).exists()


async def test_a_teardown_failure_never_replaces_the_error_of_the_run(tmp_path: Path, qemu: FakeQemu) -> None:
    qemu.job_error = "Input/output error"
    recorder = Recorder(qemu, fail_teardown=True)
    result = await GuestRun(request(tmp_path, qemu, (recorder,))).backup()
    assert result.error is not None and "Input/output error" in result.error
    assert any("recorder teardown failed" in w for w in result.warnings)


async def test_a_teardown_failure_fails_a_run_that_had_no_error(tmp_path: Path, qemu: FakeQemu) -> None:
    result = await GuestRun(request(tmp_path, qemu, (Recorder(qemu, fail_teardown=True),))).backup()
    assert result.status == "error" and result.error == "recorder teardown failed"


@pytest.fixture
async def fleecing_qemu(short_dir: Path) -> AsyncIterator[FakeQemu]:
    async with FakeQemu(short_dir / "qmp.sock", [FakeDisk("scsi0", 2 * MiB)], fleecing=True) as fake:
        yield fake


def fleecing(tmp_path: Path) -> FleecingFeature:
    store = tmp_path / "fleece"
    store.mkdir()
    storages = parse_storage_cfg(f"dir: fast\n\tpath {store}\n\tcontent images\n", "storage.cfg")
    versions = available_versions()
    if not versions:
        pytest.skip("no qemu-img here")
    return FleecingFeature(fleecing_storage(storages, "fast"), qemu_img=str(next(iter(versions.values())).img))


async def test_fleecing_takes_the_snapshot_point_inside_the_window(tmp_path: Path, fleecing_qemu: FakeQemu) -> None:
    feature = fleecing(tmp_path)
    recorder = Recorder(fleecing_qemu)
    run = GuestRun(request(tmp_path, fleecing_qemu, (feature, recorder), mode="suspend"))
    result = await run.backup()
    assert result.status == "ok", result.error
    commands = fleecing_qemu.commands()
    assert commands.index("stop") < commands.index("qom-set") < commands.index("transaction") < commands.index("cont")
    backups = [a["data"] for a in dict(fleecing_qemu.log)["transaction"]["actions"]]
    assert [b["device"] for b in backups] == ["qmpbackup-100-scsi0-snap"]
    assert_nothing_left(tmp_path, fleecing_qemu, run)
    assert not list((tmp_path / "fleece").rglob("*fleece*")), "fleecing image left behind"


async def test_fleecing_teardown_never_replaces_the_job_error(tmp_path: Path, fleecing_qemu: FakeQemu) -> None:
    fleecing_qemu.job_error = "Input/output error"
    fleecing_qemu.busy_nodes.add("qmpbackup-100-scsi0-cbw")  # the filter cannot be removed
    result = await GuestRun(request(tmp_path, fleecing_qemu, (fleecing(tmp_path),))).backup()
    assert result.error is not None and "Input/output error" in result.error, result.error
    assert "busy" not in result.error
    assert any("busy" in w for w in result.warnings)
