from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from qmpbackup.journal import Entry, Journal, JournalError, unwind


def test_record_resolve_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j" / "100.jsonl"
    with Journal.open(path) as j:
        a = j.record("blockdev", node="qmpbackup-100-scsi0-cbw")
        b = j.record("file", path="/x")
        j.resolve(a)
    with Journal.open(path) as j:
        assert [e.kind for e in j.pending()] == ["file"]
        c = j.record("blockdev", node="n2")
        assert c.id > b.id
        j.resolve(j.pending()[0])
        j.resolve(c)
    assert not path.exists(), "an empty journal is removed"


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    with Journal.open(path) as j:
        j.record("file", path="/x")
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


async def test_unwind_reverse_order_keeps_failures_pending(tmp_path: Path) -> None:
    path = tmp_path / "100.jsonl"
    undone: list[int] = []

    async def ok(entry: Entry) -> None:
        undone.append(entry.id)

    async def broken(entry: Entry) -> None:
        raise RuntimeError("device busy")

    async def stuck(entry: Entry) -> None:
        await asyncio.sleep(60)

    with Journal.open(path) as j:
        for kind in ("ok", "broken", "ok", "stuck", "ok"):
            j.record(kind)
        failures = await unwind(j, {"ok": ok, "broken": broken, "stuck": stuck}, step_timeout=0.1)
        assert undone == [5, 3, 1]
        assert len(failures) == 2 and "device busy" in failures[1]
        assert [e.kind for e in j.pending()] == ["broken", "stuck"]
