"""The state of a live restore whose VM runs on the new images, in ``<run-dir>/live-restore/<vmid>/``.

It exists from the moment the VM runs until its copy finished: ``restore --live --resume``
reads it to serve the archive again, and ``cleanup`` to say that the restore is interrupted.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from qmpbackup.atomic_file import replace_file
from qmpbackup.errors import UsageError
from qmpbackup.jobs.lock import DEFAULT_RUN_DIR

STATE_FILE = "state.json"
PAUSED_FILE = "paused-by-copy"  # present: the copy paused the VM (failed, or pivoting); --resume continues it


def live_folder(run_dir: Path, vmid: int) -> Path:
    return run_dir / "live-restore" / str(vmid)


def resume_command(vmid: int, run_dir: Path) -> str:
    """The command that finishes VM ``vmid``'s interrupted live restore."""
    where = f" --run-dir {shlex.quote(str(run_dir))}" if run_dir != DEFAULT_RUN_DIR else ""
    return f"qmpbackup restore --live --resume {vmid}{where}"


@dataclass(frozen=True, slots=True)
class Target:
    """An image the copy fills: its final name, size, the archive device it comes from, and whether
    the VM's drive passes discards on (``discard=on``: the fresh image's node does too)."""

    final: Path
    size: int
    source: str
    discard: bool = False


@dataclass(frozen=True, slots=True)
class LiveState:
    """What ``--resume`` needs after this process died: the archive, the VM's QMP socket, the copies."""

    archive: Path
    qmp: Path
    speed: int
    devices: dict[str, Target]


def write_state(folder: Path, state: LiveState) -> None:
    """Written once the VM runs on the new images (atomically: a reader sees all of it or nothing)."""
    data = {"archive": str(state.archive), "qmp": str(state.qmp), "speed": state.speed,
            "devices": {d: {"image": str(t.final), "size": t.size, "source": t.source, "discard": t.discard}
                        for d, t in state.devices.items()}}
    replace_file(folder / STATE_FILE, json.dumps(data))


def interrupted_live_restore(vmid: int, run_dir: Path) -> LiveState | None:
    """The state of VM ``vmid``'s live restore that did not finish (its process died or its copy
    failed), or None. Raises UsageError for a state file that cannot be read."""
    path = live_folder(run_dir, vmid) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    try:
        devices = {str(d): Target(Path(v["image"]), int(v["size"]), str(v.get("source", d)),
                                  bool(v.get("discard", False)))
                   for d, v in data["devices"].items()}
        return LiveState(Path(data["archive"]), Path(data["qmp"]), int(data["speed"]), devices)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path} is not a live restore's state: {exc}") from exc


def live_restore_vmids(run_dir: Path) -> list[int]:
    """The VMs with a live restore state under ``run_dir`` (running or interrupted)."""
    try:
        folders = list((run_dir / "live-restore").iterdir())
    except OSError:
        return []
    return sorted(int(f.name) for f in folders if f.name.isdigit() and (f / STATE_FILE).is_file())
