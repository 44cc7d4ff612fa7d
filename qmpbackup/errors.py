"""The one error hierarchy and the one exit-code table.

Every error we raise on purpose derives from :class:`QmpBackupError` and
carries the exit code the CLI turns it into. The CLI maps exceptions to exit
codes in exactly one place (``qmpbackup.cli.main``); this table is the
contract, documented in README.md and pinned by ``tests/cli/test_exit_codes.py``:

====  ==========================================================
code  meaning
====  ==========================================================
0     success (warnings never change the exit status)
1     the operation failed (a guest's backup, a verify that found damage)
2     bad usage or configuration (bad option, unknown key, missing file)
128+N the run was ended by signal N (130 for SIGINT, 143 for SIGTERM)
====  ==========================================================

Exception tree::

    QmpBackupError              exit 1, operation failed
     +-- UsageError             exit 2, the command line is wrong
     |    +-- ConfigError       exit 2, a config file is wrong (names file and line)
     +-- StateError             exit 1, an object was used in the wrong state (a bug)
     +-- (subpackages add their own, e.g. vma.VmaFormatError)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL_BASE = 128


class QmpBackupError(Exception):
    """Base of every error qmpbackup raises on purpose; its text is the user message."""

    exit_code: int = EXIT_FAILED


class UsageError(QmpBackupError):
    """The command line asks for something impossible or malformed."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration file or option value is wrong.

    ``path`` and ``line`` (1-based) say where, when the value came from a file.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class StateError(QmpBackupError):
    """A long-lived object was asked to do something its current state forbids."""

    def __init__(self, what: str, state: object, required: object) -> None:
        self.state = state
        self.required = required
        super().__init__(f"{what}: state is {state}, needs {required}")
