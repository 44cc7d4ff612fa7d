"""What every subcommand shares: the run context, global options, output helpers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from qmpbackup.config_text import INT64_MAX, parse_integer
from qmpbackup.errors import ConfigError, UsageError
from qmpbackup.guest_config import check_vmid
from qmpbackup.jobs.vzdump_conf import parse_option

DEFAULT_CONFIG_DIR = Path("/etc/qmpbackup")
CONFIG_DIR_ENV = "QMPBACKUP_CONFIG_DIR"


@dataclass(frozen=True, slots=True)
class Context:
    """Resolved global options, handed to every command's ``run``."""

    config_dir: Path
    debug: bool


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (a :class:`UsageError`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Unknown arguments are reported by the (sub)command that got them, naming its ``--help``."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        if not hasattr(parsed, HELP_PROG):
            setattr(parsed, HELP_PROG, self.prog)  # the innermost command sets it first
        return parsed, extras


HELP_PROG = "_help_prog"


def with_help_hint(exc: UsageError, args: argparse.Namespace | None) -> str:
    """The error's line; a bad option value from the command line points to the command's ``--help``."""
    text = str(exc)
    if not isinstance(exc, ConfigError) or exc.path is not None or "--help" in text:
        return text
    prog = getattr(args, HELP_PROG, "qmpbackup") if args is not None else "qmpbackup"
    return f"{text} (see '{prog} --help')"


def global_options() -> ArgumentParser:
    """A parent parser with the options accepted before or after any subcommand name.

    Defaults are SUPPRESS so that a value given before the subcommand is not
    overwritten by the subparser's default.
    """
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--config-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"configuration directory (default ${CONFIG_DIR_ENV} or {DEFAULT_CONFIG_DIR})",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log debug messages and show tracebacks",
    )
    return common


def context_from(args: argparse.Namespace) -> Context:
    """The only place that reads the environment for global settings."""
    config_dir = getattr(args, "config_dir", None) or os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR
    return Context(config_dir=Path(config_dir), debug=bool(getattr(args, "debug", False)))


def quiet_stderr() -> None:
    """``quiet 1``: only warnings and errors on stderr (log files are written apart from this)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def add_output_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-format",
        choices=("text", "json"),
        default="text",
        help="text for people, json (on stdout) for tools",
    )


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def print_json_line(value: Any) -> None:
    """One JSON object on one line, for tools that read a stream of results."""
    sys.stdout.write(json.dumps(value, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dumpdir DIR | --storage ID``, shared by the commands that work on a dump directory."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dumpdir", metavar="DIR", help="the dump directory (default: from vzdump.conf)")
    group.add_argument("--storage", metavar="ID", help="a storage from storage.cfg; backups are in <path>/dump")


def target_options(args: argparse.Namespace) -> dict[str, str]:
    """The vzdump options the target arguments set (only those given)."""
    options = {}
    if getattr(args, "dumpdir", None):
        options["dumpdir"] = os.path.abspath(args.dumpdir)  # logs and hooks name absolute paths, as vzdump
    if getattr(args, "storage", None):
        options["storage"] = args.storage
    return options


def integer_arg(low: int = 0, high: int = INT64_MAX) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in ``low..high`` (ASCII digits, as every number we read)."""

    def parse(text: str) -> int:
        try:
            return parse_integer(text, low, high)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def option_arg(key: str) -> Callable[[str], Any]:
    """An argparse ``type`` taking what vzdump option ``key`` takes: one parser for the flag and the config."""

    def parse(text: str) -> Any:
        try:
            return parse_option(key, text)[1]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def vmid_arg(text: str) -> int:
    try:
        return check_vmid(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
