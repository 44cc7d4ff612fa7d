from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from qmpbackup.recovery import kinds
from qmpbackup.recovery.instance import QemuInstance
from qmpbackup.recovery.journal import Entry, Journal, JournalError
from qmpbackup.recovery.replay import Sessions, replay


def test_record_resolve_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j" / "100.jsonl"
    with Journal.open(path) as j:
        a = j.record(kinds.BLOCKDEV, node="qmpbackup-100-scsi0-cbw")
        b = j.record(kinds.OUTPUT_FILE, path="/x")
        j.resolve(a)
    with Journal.open(path) as j:
        assert [e.kind for e in j.pending()] == ["output-file"]
        c = j.record(kinds.BLOCKDEV, node="n2")
        assert c.id > b.id
        j.resolve(j.pending()[0])
        j.resolve(c)
    assert not path.exists(), "an empty journal is removed"


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    with Journal.open(path) as j:
        j.record(kinds.OUTPUT_FILE, path="/x")
    with path.open("ab") as f:
        f.write(b'{"v":1,"op":"add","id":2,"ki')
    with Journal.open(path) as j:
        assert [e.data["path"] for e in j.pending()] == ["/x"]


@pytest.mark.parametrize(
    "content",
    [b'{"v":2,"op":"add","id":1,"kind":"x","data":{}}\n', b"garbage\n{}\n", b'{"v":1,"op":"what","id":1}\n'],
)
def test_bad_journal_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "100.jsonl"
    path.write_bytes(content)
    with pytest.raises(JournalError):
        Journal.open(path)


def _hold(path: str, ready: "multiprocessing.synchronize.Event", stop: "multiprocessing.synchronize.Event") -> None:
    with Journal.open(Path(path)):
        ready.set()
        stop.wait(10)


def test_second_run_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(path), ready, stop))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(JournalError, match="in use"):
            Journal.open(path)
    finally:
        stop.set()
        proc.join(10)


async def test_replay_reverse_order_keeps_failures_pending(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    undone: list[int] = []

    async def ok(entry: Entry) -> None:
        undone.append(entry.id)

    async def broken(entry: Entry) -> None:
        raise RuntimeError("device busy")

    async def stuck(entry: Entry) -> None:
        await asyncio.sleep(60)

    table = {"output-file": ok, "run-folder": broken, "freeze": stuck}
    with Journal.open(path) as j:
        for kind in (kinds.OUTPUT_FILE, kinds.RUN_FOLDER, kinds.OUTPUT_FILE):
            j.record(kind, path="/x")
        j.record(kinds.FREEZE, qga="/q", vm="VM 100")
        j.record(kinds.OUTPUT_FILE, path="/y")
        failures = await replay(j, Sessions(100, None), steps=lambda s: table, step_timeout=0.1)
        assert undone == [5, 3, 1]
        assert len(failures) == 2 and "device busy" in failures[1]
        assert [e.kind for e in j.pending()] == ["run-folder", "freeze"]


def test_record_refuses_data_outside_the_schema(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "100.jsonl") as j:
        with pytest.raises(ValueError, match="missing key 'node'"):
            j.record(kinds.BLOCKDEV, name="x")
        with pytest.raises(ValueError, match="unknown key 'extra'"):
            j.record(kinds.BLOCKDEV, node="x", extra=1)
        with pytest.raises(ValueError, match="'node' is int"):
            j.record(kinds.BLOCKDEV, node=3)
        assert j.pending() == []


async def test_entries_that_do_not_fit_their_kind_are_named_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    path.write_bytes(b'{"v":1,"op":"add","id":1,"kind":"blockdev","data":{"nod":"x"}}\n'
                     b'{"v":1,"op":"add","id":2,"kind":"teleport","data":{}}\n'
                     b'{"v":1,"op":"add","id":3,"kind":"output-file","data":{"path":"/nonexistent/a.dat"},'
                     b'"qemu":{"pid":"x"}}\n'
                     b'{"v":1,"op":"add","id":4,"kind":"output-file","data":{"path":"/nonexistent/b.dat","new":1}}\n')
    with Journal.open(path) as j:
        failures = await replay(j, Sessions(100, None))
        assert [e.id for e in j.pending()] == [1, 2, 3]
    assert len(failures) == 3
    assert "entry 3 (output-file) kept, not understood: unreadable 'qemu' field" in failures[0]
    assert "entry 2 (teleport) kept, not understood: unknown kind 'teleport'" in failures[1]
    assert "entry 1 (blockdev) kept, not understood: missing key 'node'" in failures[2]


async def test_entries_of_a_gone_qemu_are_dropped_with_one_line(tmp_path: Path) -> None:
    """Entries name their QEMU; one that is gone took its nodes along: no session needed, one INFO line."""
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    gone = QemuInstance.of(proc.pid, "/run/x.sock")
    proc.kill()
    await proc.wait()
    assert gone is not None and not gone.alive()
    dat = tmp_path / "a.vma.dat"
    dat.write_bytes(b"x")
    lines: list[str] = []
    with Journal.open(tmp_path / "100.jsonl") as j:
        j.bind(gone)
        j.record(kinds.OUTPUT_FILE, path=str(dat))
        j.record(kinds.BLOCKDEV, node="qmpbackup-100-scsi0-cbw")
        j.record(kinds.DRIVE_FILTER, qdev="scsi0", qom_path="/machine/peripheral/scsi0", original="drive-scsi0",
                 filter="qmpbackup-100-scsi0-cbw")
        assert await replay(j, Sessions(100, None), info=lines.append) == []
        assert j.pending() == []
    assert lines == [f"dropped 2 journal entries of QEMU pid {proc.pid} (/run/x.sock) that is gone "
                     "(what it held went with it)"]
    assert not dat.exists()


async def test_entries_of_a_running_unreachable_qemu_are_kept(tmp_path: Path) -> None:
    """A QEMU that runs but cannot be reached is never taken for a gone one."""
    alive = QemuInstance.of(os.getpid(), str(tmp_path / "missing.sock"))
    assert alive is not None
    with Journal.open(tmp_path / "100.jsonl") as j:
        j.bind(alive)
        j.record(kinds.BLOCKDEV, node="qmpbackup-100-scsi0-cbw")
        j.record(kinds.FLEECING_IMAGE, storeid="s", storage_type="dir", name="vm-100-fleece-0.qcow2",
                 path=str(tmp_path / "img"), format="qcow2", size=1, alloc_size=1, cluster_size=65536,
                 preallocation="off", volume=None)
        sessions = Sessions(100, None, connect=True)
        failures = await replay(j, sessions)
        assert len(j.pending()) == 2
    assert len(failures) == 1 and "kept 2 journal entries" in failures[0] and "cannot be reached" in failures[0]
    assert sessions.unreachable()


def test_spawn_records_are_checked_key_by_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from qmpbackup.recovery.spawned import ProcessRecord, read_records, write_record
    from qmpbackup.recovery.state import spawn_records_dir

    good = ProcessRecord(100, 4242, 1.5, 4343, 2.5, "/tmp/qmpbackup-x")
    write_record(tmp_path, good)
    folder = spawn_records_dir(tmp_path)
    (folder / "qemu-101-1.json").write_text('{"vmid": 101, "pid": "1", "create_time": 1, "owner_pid": 2, '
                                            '"owner_create_time": 2, "rundir": "/x"}')
    (folder / "qemu-102-1.json").write_text('{"vmid": 102, "pid": 1}')
    (folder / "qemu-103-1.json").write_text('[1, 2]')
    assert read_records(tmp_path) == [good]
    assert sorted(p.name for p in folder.iterdir()) == [good.file_name]
    assert "key 'pid' missing or not int" in caplog.text and "key 'create_time'" in caplog.text
    assert "not a JSON object" in caplog.text
