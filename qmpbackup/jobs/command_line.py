"""The ``starting new backup job: vzdump …`` line: the job's options as one shell-quoted command.

vzdump logs the options a job really runs with (job and command line merged), so that
the line can be pasted into a shell; we print the same, whichever way the job started
(``backup``, ``jobs run``, the scheduler).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping

# Keys that select or describe the job rather than being passed on as options.
_NOT_OPTIONS = frozenset({"vmid", "all", "id", "starttime", "dow", "enabled", "stdout"})


def vzdump_command_line(vmids: Iterable[int], all_guests: bool, options: Mapping[str, str]) -> str:
    """``vzdump 100 101 --mode stop --notes-template 'a b'`` (options sorted, values quoted)."""
    words = ["vzdump"]
    if all_guests:
        words += ["--all", "1"]
    else:
        words += [str(v) for v in vmids]
    for key in sorted(options):
        if key in _NOT_OPTIONS:
            continue
        if key == "mailto":
            for address in options[key].replace(";", ",").split(","):
                if address.strip():
                    words += ["--mailto", address.strip()]
            continue
        words += [f"--{key}", options[key]]
    return shlex.join(words)
