"""The job's result mail: who gets it, what it says, and sending it with ``sendmail``.

People rely on vzdump's status mail to notice failed backups, so we send the
same one: subject ``vzdump backup status (<host>): <status>``, a table of each
guest's result, size and time, then the logs (each guest line prefixed with its
VMID, cut at 1 MiB). Composing is pure; sending is one child process.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from qmpbackup.errors import QmpBackupError
from qmpbackup.jobs.vzdump_conf import VzdumpOptions
from qmpbackup.render import render_bytes, render_duration

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 1024 * 1024
TRUNCATED = "Log output was too long and was truncated."
SENDMAIL_CANDIDATES = ("/usr/sbin/sendmail", "/usr/lib/sendmail")
SENDMAIL_TIMEOUT_S = 60.0


class NotifyError(QmpBackupError):
    """The mail could not be handed to sendmail."""


@dataclass(frozen=True, slots=True)
class MailGuest:
    vmid: int
    ok: bool
    duration_s: float
    name: str | None = None
    size: int | None = None
    filename: str | None = None
    error: str | None = None
    log_lines: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class JobReport:
    hostname: str
    cmdline: str
    guests: Sequence[MailGuest]
    total_time_s: float
    job_id: str | None = None
    error: str | None = None  # a job-level error (hook, lock, storage)
    job_log: Sequence[str] = field(default_factory=tuple)  # job-init / job-start output

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not g.ok for g in self.guests)


def status_text(report: JobReport) -> str:
    """``backup successful`` / ``backup failed: <err>`` / ``backup failed: multiple problems``."""
    if not report.failed:
        return "backup successful"
    problems = ([report.error] if report.error else []) + [g.error or "failed" for g in report.guests if not g.ok]
    if len(problems) == 1:
        return f"backup failed: {problems[0]}"
    return "backup failed: multiple problems"


def mail_recipients(options: VzdumpOptions, report: JobReport) -> tuple[str, ...]:
    """Who gets the legacy mail (empty: none), per notification-mode and mailnotification."""
    mode = options.notification_mode
    if mode == "notification-system":
        log.info("notification-mode=notification-system: no notification system here; no mail sent")
        return ()
    if not options.mailto:
        if mode == "legacy-sendmail":
            log.info("notification-mode=legacy-sendmail but no mailto; no mail sent")
        return ()
    policy = options.notification_policy or options.mailnotification
    if policy == "never" or (policy == "failure" and not report.failed):
        return ()
    return options.mailto


def _logs(report: JobReport) -> str:
    parts = [report.cmdline, ""] + list(report.job_log)
    for g in report.guests:
        parts.append("")
        parts.extend(f"{g.vmid}: {line}" for line in g.log_lines if not line.lstrip().startswith("status:"))
    text = "\n".join(parts).rstrip() + "\n"
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_LOG_BYTES:
        cut = encoded[:MAX_LOG_BYTES].decode("utf-8", errors="ignore")
        text = cut[: cut.rfind("\n") + 1] + "\n" + TRUNCATED + "\n"
    return text


def compose_mail(report: JobReport, recipients: Sequence[str], sender: str = "root") -> EmailMessage:
    """The status mail as vzdump writes it (plain text)."""
    header = ("VMID", "Name", "Status", "Time", "Size", "Filename")
    rows = [
        (
            str(g.vmid),
            g.name or "",
            "ok" if g.ok else "err",
            render_duration(g.duration_s),
            render_bytes(g.size) if g.size is not None else "",
            g.filename or (g.error or ""),
        )
        for g in report.guests
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])
    total_size = sum(g.size or 0 for g in report.guests)
    body = (
        "Details\n=======\n"
        f"{table}\n\n"
        f"Total running time: {render_duration(report.total_time_s)}\n"
        f"Total size: {render_bytes(total_size)}\n"
        + (f"\nError: {report.error}\n" if report.error else "")
        + "\nLogs\n====\n"
        + _logs(report)
    )
    msg = EmailMessage()
    msg["Subject"] = f"vzdump backup status ({report.hostname}): {status_text(report)}"
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    if report.job_id:
        msg["X-Qmpbackup-Job-Id"] = report.job_id
    msg.set_content(body)
    return msg


def find_sendmail() -> Path | None:
    for candidate in SENDMAIL_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    found = shutil.which("sendmail")
    return Path(found) if found else None


def send_mail(msg: EmailMessage, recipients: Sequence[str], sendmail: Path | None = None) -> bool:
    """Hand the mail to sendmail; False (with a warning) when there is no sendmail."""
    binary = sendmail or find_sendmail()
    if binary is None:
        log.warning("sendmail not found; status mail to %s not sent", ", ".join(recipients))
        return False
    sender = str(msg["From"] or "root")
    try:
        subprocess.run(
            [str(binary), "-f", sender, "--", *recipients],
            input=msg.as_bytes(), check=True, capture_output=True, timeout=SENDMAIL_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise NotifyError(f"sendmail failed (exit {exc.returncode}): {detail[0] if detail else ''}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NotifyError(f"cannot run {binary}: {exc}") from exc
    log.info("status mail sent to %s", ", ".join(recipients))
    return True


def notify(options: VzdumpOptions, report: JobReport, sendmail: Path | None = None) -> bool:
    """Send the job's status mail if the options ask for one. Returns whether a mail was sent."""
    recipients = mail_recipients(options, report)
    if not recipients:
        return False
    return send_mail(compose_mail(report, recipients), recipients, sendmail)
