"""``qmpbackup jobs``: scheduled jobs from jobs.cfg, and calendar-event previews."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from qmpbackup.cli.common import ArgumentParser, Context, add_output_format, integer_arg, print_json
from qmpbackup.jobs.calendar import next_event, next_events, parse_calendar_event
from qmpbackup.jobs.jobs_cfg import BackupJob, find_job, load_jobs_cfg
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR
from qmpbackup.jobs.scheduler import (
    STATE_FILE,
    Scheduler,
    backup_command,
    load_state,
    next_run,
    spawn_job,
)
from qmpbackup.recovery.state import DEFAULT_STATE_DIR

log = logging.getLogger(__name__)



def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("jobs", parents=[common], help="scheduled backup jobs (jobs.cfg)")
    sub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND", parser_class=ArgumentParser)
    sub.required = True
    n = sub.add_parser("next-events", parents=[common], help="when a calendar event fires next")
    n.add_argument("spec", metavar="SPEC", help="a calendar event, e.g. 'mon..fri 21:00'")
    n.add_argument("--after", type=integer_arg(), metavar="EPOCH", help="start after this time (default: now)")
    n.add_argument("--count", type=integer_arg(1), default=10, metavar="N", help="how many (default 10)")
    add_output_format(n)
    n.set_defaults(run=run_next_events)
    ls = sub.add_parser("list", parents=[common], help="the jobs in jobs.cfg and their next run")
    add_output_format(ls)
    _add_state_dir(ls)
    ls.set_defaults(run=run_list)
    r = sub.add_parser("run", parents=[common], help="run a job now (does not change its schedule)")
    r.add_argument("job_id", metavar="ID", help="the job's id in jobs.cfg")
    _add_state_dir(r)
    _add_run_dir(r)
    r.set_defaults(run=run_job_now)
    s = subparsers.add_parser(
        "scheduler",
        parents=[common],
        help="run the jobs of jobs.cfg on their schedules (a service)",
        description="Every minute, run the due jobs of jobs.cfg one at a time (as pvescheduler does). "
        "Runs until stopped by SIGTERM/SIGINT.",
    )
    _add_state_dir(s)
    _add_run_dir(s)
    s.set_defaults(run=run_scheduler)


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
        help=f"where the scheduler keeps {STATE_FILE} and the backups their journals (default {DEFAULT_STATE_DIR})",
    )  # fmt: skip


def _add_run_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                        help=f"the backups' host lock and pid file (default {DEFAULT_RUN_DIR})")


def _local(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def run_next_events(args: argparse.Namespace, ctx: Context) -> int:
    event = parse_calendar_event(args.spec)
    after = int(time.time()) if args.after is None else args.after
    events = next_events(event, after, args.count)
    if args.output_format == "json":
        print_json(events)
    elif not events:
        print("the event never fires")
    else:
        for epoch in events:
            print(f"{_local(epoch)}  ({epoch})")
    return 0


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    jobs = load_jobs_cfg(ctx.config_dir)
    now = int(time.time())
    state = load_state(args.state_dir / STATE_FILE)
    rows: list[dict[str, Any]] = []
    for job in jobs:
        s = job.settings
        if job.id in state:
            nxt = next_run(job, state)
        else:
            nxt = next_event(job.schedule, now) if job.enabled else None
        rows.append(
            {
                "id": job.id,
                "enabled": job.enabled,
                "schedule": job.schedule_text,
                "next_run": nxt,
                "repeat_missed": job.repeat_missed,
                "storage": s.storage,
                "dumpdir": str(s.dumpdir) if s.dumpdir else None,
                "all": s.all,
                "vmid": list(s.vmid),
                "exclude": list(s.exclude),
                "pool": s.pool,
                "comment": job.comment,
                "last_run": state[job.id].last_run if job.id in state else None,
                "last_status": state[job.id].last_status if job.id in state else None,
            }
        )
    if args.output_format == "json":
        print_json(rows)
        return 0
    if not rows:
        print("no jobs")
        return 0
    for r in rows:
        guests = "all" if r["all"] else (f"pool {r['pool']}" if r["pool"] else ",".join(map(str, r["vmid"])))
        if r["exclude"]:
            guests += " except " + ",".join(map(str, r["exclude"]))
        where = r["storage"] or r["dumpdir"] or "(default)"
        when = _local(r["next_run"]) if r["next_run"] is not None else ("disabled" if not r["enabled"] else "never")
        print(f"{r['id']}: schedule '{r['schedule']}', next {when}, guests {guests}, target {where}")
    return 0


async def run_job_now(args: argparse.Namespace, ctx: Context) -> int:
    job: BackupJob = find_job(load_jobs_cfg(ctx.config_dir), args.job_id)
    log.info("running job %s now", job.id)
    return await spawn_job(backup_command(job, ctx.config_dir, args.state_dir, args.run_dir))


async def run_scheduler(args: argparse.Namespace, ctx: Context) -> int:
    scheduler = Scheduler(
        ctx.config_dir,
        args.state_dir / STATE_FILE,
        lambda job: spawn_job(backup_command(job, ctx.config_dir, args.state_dir, args.run_dir)),
    )
    await scheduler.run_forever()
    return 0
