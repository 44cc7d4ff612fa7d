"""The one way to run a host tool: its output, and every way it fails as one line."""

from __future__ import annotations

import time

import pytest

from qmpbackup.host_command import CANNOT_START, HostCommandError, run_host_command, run_host_command_sync


async def test_output_and_failures_async() -> None:
    assert await run_host_command(["sh", "-c", "echo out; echo err >&2"]) == "out\n"
    with pytest.raises(HostCommandError, match=r"^sh failed: second$") as failed:
        await run_host_command(["sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    assert failed.value.returncode == 3 and failed.value.argv[0] == "sh"
    with pytest.raises(HostCommandError, match=r"^sh failed: exit status 4$"):
        await run_host_command(["sh", "-c", "exit 4"])
    with pytest.raises(HostCommandError, match=r"^cannot run /nonexistent/tool: No such file") as missing:
        await run_host_command(["/nonexistent/tool"])
    assert missing.value.returncode == CANNOT_START


async def test_a_tool_past_its_time_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(HostCommandError, match=r"^sleep timed out after 0.2 s$") as late:
        await run_host_command(["sleep", "60"], timeout=0.2)
    assert late.value.returncode is None and time.monotonic() - started < 30


def test_output_and_failures_sync() -> None:
    assert run_host_command_sync(["sh", "-c", "echo out; echo err >&2"]) == "out\n"
    with pytest.raises(HostCommandError, match=r"^sh failed: second$"):
        run_host_command_sync(["sh", "-c", "echo first >&2; echo second >&2; exit 3"])
    with pytest.raises(HostCommandError, match=r"^cannot run /nonexistent/tool: No such file"):
        run_host_command_sync(["/nonexistent/tool"])
    with pytest.raises(HostCommandError, match=r"^sleep timed out after 0.2 s$"):
        run_host_command_sync(["sleep", "60"], timeout=0.2)
