"""Where recovery keeps its files: the state dir, each VM's journal, the spawned-QEMU records."""

from __future__ import annotations

from pathlib import Path

#: ``--state-dir`` of ``backup``, ``cleanup`` and ``jobs``: journals, spawn records, scheduler state.
DEFAULT_STATE_DIR = Path("/var/lib/qmpbackup")


def journal_path(state_dir: Path, vmid: int) -> Path:
    """VM ``vmid``'s journal."""
    return state_dir / "journal" / f"{vmid}.jsonl"


def journaled_vmids(state_dir: Path) -> list[int]:
    """The VMs that have a journal (something may be left behind)."""
    d = state_dir / "journal"
    return sorted(int(p.stem) for p in d.glob("*.jsonl") if p.stem.isdigit()) if d.is_dir() else []


def spawn_records_dir(state_dir: Path) -> Path:
    """The records of QEMUs we spawned (:mod:`qmpbackup.recovery.spawned`)."""
    return state_dir / "spawned"
