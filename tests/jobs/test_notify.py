"""The status mail: recipients policy, content, log truncation, a real (fake) sendmail child."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qmpbackup.jobs.notify import (
    MAX_LOG_BYTES,
    TRUNCATED,
    MailGuest,
    JobReport,
    NotifyError,
    compose_mail,
    mail_recipients,
    notify,
    status_text,
)
from qmpbackup.jobs.vzdump_conf import VzdumpOptions

OK = MailGuest(100, True, 118, name="web01", size=5 * 2**30, filename="vzdump-qemu-100-x.vma.zst",
                 log_lines=["2024-03-29 14:37:12 INFO: Starting Backup of VM 100 (qemu)", "status: 3%"])
BAD = MailGuest(101, False, 3, name="db", error="guest agent not running", log_lines=["ERROR: boom"])


def report(*guests: MailGuest, error: str | None = None) -> JobReport:
    return JobReport("pve1", "qmpbackup backup 100 101", guests, 121, job_id="nightly", error=error,
                     job_log=["INFO: hook job-start ok"])


def test_status_text() -> None:
    assert status_text(report(OK)) == "backup successful"
    assert status_text(report(OK, BAD)) == "backup failed: guest agent not running"
    assert status_text(report(BAD, error="lock timeout")) == "backup failed: multiple problems"


def test_recipients_policy() -> None:
    to = ("root@example.com",)
    assert mail_recipients(VzdumpOptions(mailto=to), report(OK)) == to
    assert mail_recipients(VzdumpOptions(mailto=to, mailnotification="failure"), report(OK)) == ()
    assert mail_recipients(VzdumpOptions(mailto=to, mailnotification="failure"), report(BAD)) == to
    assert mail_recipients(VzdumpOptions(), report(BAD)) == ()
    assert mail_recipients(VzdumpOptions(mailto=to, notification_mode="notification-system"), report(BAD)) == ()
    assert mail_recipients(VzdumpOptions(mailto=to, notification_policy="never"), report(BAD)) == ()


def test_mail_content() -> None:
    msg = compose_mail(report(OK, BAD), ["a@example.com", "b@example.com"])
    assert msg["Subject"] == "vzdump backup status (pve1): backup failed: guest agent not running"
    assert msg["To"] == "a@example.com, b@example.com"
    body = msg.get_content()
    lines = body.splitlines()
    assert lines[2].split() == ["VMID", "Name", "Status", "Time", "Size", "Filename"]
    assert lines[3].split() == ["100", "web01", "ok", "1m", "58s", "5.0", "GiB", "vzdump-qemu-100-x.vma.zst"]
    assert lines[4].split()[:3] == ["101", "db", "err"]
    assert "Total running time: 2m 1s" in body and "Total size: 5.0 GiB" in body
    assert "100: 2024-03-29 14:37:12 INFO: Starting Backup of VM 100 (qemu)" in body
    assert "101: ERROR: boom" in body and "status: 3%" not in body
    assert "qmpbackup backup 100 101" in body and "INFO: hook job-start ok" in body


def test_long_logs_are_truncated() -> None:
    big = MailGuest(100, True, 1, log_lines=[f"line {i} " + "x" * 100 for i in range(20000)])
    body = compose_mail(report(big), ["a@b"]).get_content()
    assert len(body.encode()) < MAX_LOG_BYTES + 10000
    assert body.rstrip().endswith(TRUNCATED)


def fake_sendmail(tmp_path: Path, exit_code: int = 0) -> Path:
    script = tmp_path / "sendmail"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat > {tmp_path}/mail\n'
                      f'echo "no relay" >&2\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_send_through_sendmail(tmp_path: Path) -> None:
    options = VzdumpOptions(mailto=("root@example.com",))
    assert notify(options, report(OK), sendmail=fake_sendmail(tmp_path))
    assert (tmp_path / "args").read_text().split() == ["-f", "root", "--", "root@example.com"]
    mail = (tmp_path / "mail").read_text()
    assert "Subject: vzdump backup status (pve1): backup successful" in mail
    assert not notify(VzdumpOptions(mailto=("x@y",), mailnotification="failure"), report(OK),
                      sendmail=fake_sendmail(tmp_path))


def test_sendmail_failure(tmp_path: Path) -> None:
    with pytest.raises(NotifyError, match="exit 75.*no relay"):
        notify(VzdumpOptions(mailto=("a@b",)), report(OK), sendmail=fake_sendmail(tmp_path, 75))
