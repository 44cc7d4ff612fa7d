"""Run the CLI's ``main`` in this process, as a child process would see it: argv, stdin, stdout, stderr, env.

A child costs the interpreter's start and the command's imports (about a second on the
test machines, more under load); where the test looks only at exit codes and output, the
child adds nothing. Tests of signals, of inherited descriptors or of a crash keep a real
child process.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from qmpbackup.cli.main import main


@contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        time.tzset()


def run_main(*args: str | Path, stdin: bytes = b"", env: Mapping[str, str] | None = None,
             ) -> subprocess.CompletedProcess[bytes]:
    """``qmpbackup ARGS`` in-process: its exit code and the bytes it wrote to stdout and stderr."""
    argv = [str(a) for a in args]
    out, err = io.BytesIO(), io.BytesIO()
    streams = (sys.stdin, sys.stdout, sys.stderr)
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level, logging.getLogger("qemu.qmp").level)
    wrappers = (io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
                io.TextIOWrapper(out, encoding="utf-8", write_through=True),
                io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True))
    sys.stdin, sys.stdout, sys.stderr = wrappers
    try:
        with _environment(env):
            try:
                code = main(argv)
            except SystemExit as exc:  # --help and --version end in argparse
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for wrapper in wrappers:
            wrapper.flush()
            wrapper.detach()  # (closing a wrapper would close the buffer we read below)
        sys.stdin, sys.stdout, sys.stderr = streams
        handlers, level, qmp_level = saved_logging
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("qemu.qmp").setLevel(qmp_level)
    return subprocess.CompletedProcess(["qmpbackup", *argv], code, out.getvalue(), err.getvalue())


def run_main_text(*args: str | Path, stdin: bytes = b"", env: Mapping[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    """:func:`run_main` with stdout and stderr decoded, like ``subprocess.run(..., text=True)``."""
    proc = run_main(*args, stdin=stdin, env=env)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
