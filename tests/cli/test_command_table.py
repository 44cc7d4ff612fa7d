"""The CLI imports only the command it runs; its table of commands matches what the modules register."""

from __future__ import annotations

import importlib
import subprocess
import sys

from qmpbackup.cli.common import ArgumentParser, global_options
from qmpbackup.cli.main import COMMAND_MODULES, COMMANDS, build_parser


def test_the_table_names_exactly_the_commands_each_module_registers() -> None:
    for module in COMMAND_MODULES:
        parser = ArgumentParser(prog="qmpbackup")
        sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
        importlib.import_module(f"qmpbackup.cli.{module}").register(sub, global_options())
        assert sorted(sub.choices) == sorted(name for name, m in COMMANDS.items() if m == module), module


def test_without_a_command_every_command_is_there() -> None:
    for argv in ([], ["--help"], ["bakup"]):
        sub = next(a for a in build_parser(argv)._actions if a.dest == "command")
        assert list(sub.choices or []) == list(COMMANDS)  # in the table's (the help's) order


def test_a_command_does_not_import_the_others() -> None:
    code = ("import contextlib, sys\n"
            "from qmpbackup.cli.main import main\n"
            "with contextlib.suppress(SystemExit):\n"
            "    main(['list', '--help'])\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('qmpbackup.backup', 'fleecing', 'qemu'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: qmpbackup list" in proc.stdout
    assert proc.stdout.splitlines()[-1].strip() == ""
