"""The guard: thaws the guest (or resumes the VM) when the run that froze (paused) it dies.

A SIGKILL takes a run with no ``finally``; a frozen guest then blocks every write until
someone thaws it. So before each freeze (or pause) the run starts this program as its own
process, in its own session (a kill of the run's process group does not reach it), with
stdin the read end of a pipe whose write end only the run holds:

- the run writes ``done`` once the window has closed (guest thawed, VM resumed): the guard
  exits without touching anything;
- end of file without ``done`` means the run is gone: the guard connects to the guest agent
  (``--qga``; the single-client socket is free once the run is gone), resyncs, and thaws if
  ``guest-fsfreeze-status`` says frozen; or to QMP (``--qmp``) and sends ``cont`` if the VM
  is ``paused``. Then it exits.

It imports nothing of qmpbackup and only the standard library, so it starts in
milliseconds (``python -I -S <this file>``) and does not depend on the run's
environment. It never lives beyond its bounds: ``--armed-for`` seconds waiting for the
window to close (then the run, still alive, thaws by itself), ``--act-for`` seconds
trying to reach the agent or QEMU. What it did, or could not do, goes to stderr and syslog.
It writes ``ready`` on stdout once it watches the pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import socket
import sys
import syslog
import time
from collections.abc import Callable
from typing import Any

ARMED_FOR_S = 7200.0  # above the longest freeze window (vzdump's freeze, status polls and thaw limits)
ACT_FOR_S = 60.0
ATTEMPT_S = 3.0  # one connection's wait for an answer; then a new connection
RETRY_PAUSE_S = 0.1
SENTINEL = b"\xff"


class Gone(Exception):
    """The socket has no listener: its QEMU is gone, and the freeze or pause with it."""


def say(label: str, message: str, priority: int = syslog.LOG_WARNING) -> None:
    line = f"qmpbackup guard: {label}: {message}"
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    try:
        syslog.openlog("qmpbackup", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(priority, line)
    except OSError:
        pass


class Line:
    """A unix stream socket read as newline-terminated JSON, every read bounded by ``until``."""

    def __init__(self, path: str, until: float) -> None:
        self.until = until
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self._left())
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise Gone(f"{path}: {exc.strerror}") from exc
        except OSError:
            self.sock.close()
            raise

    def _left(self) -> float:
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        return left

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(data)

    def _fill(self) -> None:
        self.sock.settimeout(self._left())
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by the other side")
        self.buf += chunk

    def skip_past_sentinel(self) -> None:
        while SENTINEL not in self.buf:
            self.buf = b""
            self._fill()
        self.buf = self.buf[self.buf.index(SENTINEL) + 1:]

    def reply(self) -> dict[str, Any]:
        """The next JSON object (blank and unparsable lines are skipped)."""
        while True:
            while b"\n" not in self.buf:
                if len(self.buf) > 1 << 20:
                    raise ValueError("reply too long")
                self._fill()
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                value = json.loads(line.lstrip(SENTINEL).strip() or b"null")
            except ValueError:
                continue
            if isinstance(value, dict):
                return value

    def close(self) -> None:
        self.sock.close()


def act(path: str, label: str, act_for: float, attempt_s: float, step: Callable[[Line, float], str | None],
        *, socket_kind: str, failed: str) -> bool:
    """``step(connection, deadline)`` on fresh connections until it returns None (done) or time is up.

    True when done, or when nobody listens on ``path`` (its QEMU is gone, and with it what
    we would undo); else ``failed`` is reported with the last reason and False returned.
    """
    deadline = time.monotonic() + act_for
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            conn = Line(path, min(deadline, time.monotonic() + attempt_s))
        except Gone as exc:
            say(label, f"{socket_kind} socket has no QEMU behind it ({exc}); nothing to do", syslog.LOG_INFO)
            return True
        except OSError as exc:
            last = str(exc)
            time.sleep(RETRY_PAUSE_S)
            continue
        try:
            failure = step(conn, deadline)
            if failure is None:
                return True
            last = failure
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
        time.sleep(RETRY_PAUSE_S)
    say(label, f"{failed} (tried for {act_for:g} s through {path}: {last})", syslog.LOG_ERR)
    return False


def agent_call(conn: Line, command: str) -> Any:
    conn.send(json.dumps({"execute": command}).encode() + b"\n")
    reply = conn.reply()
    if "return" not in reply:
        raise ValueError(f"{command}: {reply.get('error', reply)}")
    return reply["return"]


def thaw(path: str, label: str, act_for: float) -> bool:
    """Thaw if frozen; True when the guest is (now) thawed or gone with its QEMU."""

    def step(conn: Line, deadline: float) -> str | None:
        # 0xFF resets the agent's parser; replies before the sync's own are stale
        sync_id = secrets.randbelow(2**31 - 1) + 1
        conn.send(SENTINEL + json.dumps({"execute": "guest-sync-delimited",
                                         "arguments": {"id": sync_id}}).encode() + b"\n")
        conn.skip_past_sentinel()
        while conn.reply().get("return") != sync_id:
            pass
        conn.until = deadline
        if agent_call(conn, "guest-fsfreeze-status") != "frozen":
            return None
        thawed = agent_call(conn, "guest-fsfreeze-thaw")
        if agent_call(conn, "guest-fsfreeze-status") != "thawed":
            return "still frozen after guest-fsfreeze-thaw"
        say(label, f"the qmpbackup run died during the freeze; thawed {thawed} guest filesystems")
        return None

    return act(path, label, act_for, ATTEMPT_S, step, socket_kind="guest agent",
               failed="the qmpbackup run died during the freeze and the guest could not be thawed: "
                      "run guest-fsfreeze-thaw by hand or 'qmpbackup cleanup'")


def qmp_call(conn: Line, command: str, number: int) -> Any:
    conn.send(json.dumps({"execute": command, "id": number}).encode() + b"\n")
    while True:
        reply = conn.reply()
        if reply.get("id") != number:
            continue  # events
        if "return" not in reply:
            raise ValueError(f"{command}: {reply.get('error', reply)}")
        return reply["return"]


def resume(path: str, label: str, act_for: float) -> bool:
    """``cont`` if QEMU says paused; True when the VM runs (or QEMU is gone)."""

    def step(conn: Line, deadline: float) -> str | None:
        if "QMP" not in conn.reply():
            return "no QMP greeting"
        qmp_call(conn, "qmp_capabilities", 1)
        if qmp_call(conn, "query-status", 2).get("status") != "paused":
            return None
        qmp_call(conn, "cont", 3)
        say(label, "the qmpbackup run died while the VM was paused for the backup; resumed it")
        return None

    # QMP greets once QEMU accepts us: one attempt may wait for the whole time
    return act(path, label, act_for, act_for, step, socket_kind="QMP",
               failed="the qmpbackup run died while the VM was paused and it could not be resumed: "
                      "send 'cont' by hand or run 'qmpbackup cleanup'")


def wait_for_done(armed_for: float) -> bool:
    """True when the run said ``done``; False at end of file (the run is gone)."""
    deadline = time.monotonic() + armed_for
    seen = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        readable, _, _ = select.select([0], [], [], left)
        if not readable:
            continue
        chunk = os.read(0, 64)
        if not chunk:
            return False
        seen += chunk
        if b"done" in seen:
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmpbackup-guard")
    parser.add_argument("--label", required=True)
    parser.add_argument("--qga", help="guest agent socket: thaw when the run dies")
    parser.add_argument("--qmp", help="QMP socket: cont when the run dies")
    parser.add_argument("--armed-for", type=float, default=ARMED_FOR_S)
    parser.add_argument("--act-for", type=float, default=ACT_FOR_S)
    args = parser.parse_args(argv)
    os.write(1, b"ready\n")
    os.close(1)
    try:
        if wait_for_done(args.armed_for):
            return 0
    except TimeoutError:
        say(args.label, f"the freeze or pause window stayed open for {args.armed_for:g} s; "
            "leaving it to the run")
        return 1
    ok = True
    if args.qga:
        ok = thaw(args.qga, args.label, args.act_for) and ok
    if args.qmp:
        ok = resume(args.qmp, args.label, args.act_for) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
