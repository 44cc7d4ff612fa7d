"""Entry point: parse, set up logging, run one command, map its outcome to an exit code.

This is the only place where exceptions become exit codes (see
:mod:`qmpbackup.errors` for the table). Signals (SIGINT, SIGTERM, SIGHUP)
do no work in their handlers: they cancel the running command, which unwinds
through its own ``finally`` blocks, and the run then exits with 128+N.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
import sys
from collections.abc import Awaitable, Sequence
from types import FrameType
from typing import Any

from qmpbackup import __version__
from qmpbackup.cli.common import (
    ArgumentParser,
    Context,
    context_from,
    global_options,
    with_help_hint,
)
from qmpbackup.errors import EXIT_FAILED, EXIT_SIGNAL_BASE, QmpBackupError, UsageError
from qmpbackup.render import display_name

log = logging.getLogger("qmpbackup")

# Every subcommand and the module that registers it, in the order `--help` lists them. A run
# imports only the modules of the commands its arguments name: each pulls in its part of the
# package, and all of them together take about a second to import.
COMMANDS: dict[str, str] = {
    "backup": "backup_cmd",
    "vma": "vma_cmd",
    "list": "list_cmd",
    "prune": "prune_cmd",
    "protect": "protect_cmd",
    "unprotect": "protect_cmd",
    "notes": "notes_cmd",
    "jobs": "jobs_cmd",
    "scheduler": "jobs_cmd",
    "restore": "restore_cmd",
    "verify": "verify_cmd",
    "export": "export_cmd",
    "mount": "mount_cmd",
    "umount": "mount_cmd",
    "cleanup": "cleanup_cmd",
    "index": "index_cmd",
    "start": "vm_cmd",
    "stop": "vm_cmd",
    "file-restore": "file_restore_cmd",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalExit(BaseException):
    """Raised (in synchronous commands) or recorded (in async ones) when a signal ends the run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _LevelFormatter(logging.Formatter):
    """vzdump's prefixes: ``INFO:``, ``WARN:``, ``ERROR:``; one record is one line.

    Names from archives and configs are escaped where they are put into messages; escaping the
    whole message again here (a no-op for printable text) keeps any we missed from forging a line.
    """

    NAMES = {logging.WARNING: "WARN", logging.CRITICAL: "ERROR"}

    def format(self, record: logging.LogRecord) -> str:
        record.levelprefix = self.NAMES.get(record.levelno, record.levelname)
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = display_name(record.message)
        return super().formatMessage(record)


def build_parser(argv: Sequence[str] | None = None) -> ArgumentParser:
    """The parser; given ``argv``, with only the commands it names (all if it names none)."""
    named = {COMMANDS[arg] for arg in argv if arg in COMMANDS} if argv is not None else set()
    modules = [name for name in COMMAND_MODULES if name in named] or COMMAND_MODULES
    common = global_options()
    parser = ArgumentParser(
        prog="qmpbackup",
        parents=[common],
        description="Live, consistent backups of QEMU VMs as Proxmox VMA archives.",
    )
    parser.add_argument("--version", action="version", version=f"qmpbackup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name in modules:
        module = importlib.import_module(f"qmpbackup.cli.{name}")
        module.register(sub, common)
    return parser


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter("%(levelprefix)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # qemu.qmp logs every message at DEBUG and repeats our connect errors at ERROR: quiet unless asked.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if debug else logging.CRITICAL)


def _run_async(awaitable: Awaitable[int | None]) -> int | None:
    async def guarded() -> int | None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if received:
                raise SignalExit(received[0]) from None
            raise
        finally:
            for signum in HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)

    return asyncio.run(guarded())


def _raise_signal_exit(signum: int, frame: FrameType | None) -> None:
    raise SignalExit(signum)


def run_command(args: Any, ctx: Context) -> int:
    previous = {s: signal.signal(s, _raise_signal_exit) for s in HANDLED_SIGNALS}
    try:
        result = args.run(args, ctx)
        if inspect.isawaitable(result):
            # Async commands take signals through the event loop instead.
            for s in HANDLED_SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            result = _run_async(result)
        return int(result or 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    setup_logging("--debug" in argv)
    args = None
    try:
        args = build_parser(argv).parse_args(argv)
        ctx = context_from(args)
        setup_logging(ctx.debug)
        return run_command(args, ctx)
    except UsageError as exc:
        log.debug("traceback", exc_info=True)
        log.error("%s", with_help_hint(exc, args))
        return exc.exit_code
    except QmpBackupError as exc:
        log.debug("traceback", exc_info=True)
        log.error("%s", exc)
        return exc.exit_code
    except SignalExit as exc:
        log.error("interrupted by signal %s", signal.Signals(exc.signum).name)
        return EXIT_SIGNAL_BASE + exc.signum
    except KeyboardInterrupt:
        log.error("interrupted by signal SIGINT")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`); nothing more to say.
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line, traceback only with --debug
        log.debug("traceback", exc_info=True)
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
