"""Data flows one way: CLI → jobs → backup → (qemu, guest_agent) → nbd → vma → compress.

Recovery sits beside backup: its undo table, replay and cleanup use qemu, guest_agent and
fleecing; its record-keeping modules (journal, kinds, state, spawn records, instance, host
files) are leaves that everyone below may use.

The job layer (``qmpbackup/jobs/backup_job.py``) hands fleecing to the run as a feature, so
``backup/`` never imports ``fleecing``; ``fleecing/`` is a library that uses only
``qmpbackup.qemu``, ``qmpbackup.nbd``, the journal and the storage.cfg sections it allocates
on. This test reads every module's imports and fails on an edge that goes the wrong way, so
the layering in README.md's layout stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


#: Recovery's modules that use the layers below it; nothing below may import them.
RECOVERY_UPPER = ("qmpbackup.recovery.steps", "qmpbackup.recovery.replay", "qmpbackup.recovery.cleanup")

# (package folder, forbidden import prefixes, files exempt with the reason)
RULES: list[tuple[str, tuple[str, ...], dict[str, str]]] = [
    ("qmpbackup/vma", ("qmpbackup.qemu", "qmpbackup.nbd", "qmpbackup.backup", "qemu", "qmpbackup.cli",
                       "fleecing", "argparse"), {}),
    ("qmpbackup/nbd", ("qmpbackup.qemu", "qmpbackup.backup", "qmpbackup.cli", "qmpbackup.vma", "fleecing",
                       "argparse"), {}),
    ("qmpbackup/qemu", ("qmpbackup.backup", "qmpbackup.cli", "qmpbackup.vma", "qmpbackup.nbd", "fleecing",
                        "argparse", *RECOVERY_UPPER), {}),
    ("qmpbackup/guest_agent", ("qmpbackup.backup", "qmpbackup.cli", "qmpbackup.qemu", "fleecing", "argparse",
                               *RECOVERY_UPPER), {}),
    ("qmpbackup/recovery", ("qmpbackup.backup", "qmpbackup.cli", "argparse"), {}),
    ("qmpbackup/backup", ("qmpbackup.cli", "fleecing", "qmpbackup.jobs.backup_job", "argparse"),
     {"guard_program.py": "a program of its own (the freeze guard process), with its own arguments"}),
    ("qmpbackup/cli", ("qmpbackup.backup",), {}),  # the CLI parses and prints; the job layer runs guests
    ("qmpbackup/restore", ("qmpbackup.cli", "qmpbackup.backup", "argparse"), {}),
    ("qmpbackup/store", ("qmpbackup.cli", "qmpbackup.backup", "qmpbackup.qemu", "argparse"), {}),
    ("fleecing", ("qmpbackup.cli", "qmpbackup.backup", "argparse", *RECOVERY_UPPER),
     {"bench.py": "the tuning tool drives the real block jobs"}),
]

#: What ``fleecing/`` may import from ``qmpbackup`` (everything else is above it or beside it).
#: (``qmpbackup.recovery``: its record keeping; its undo table, replay and cleanup are RECOVERY_UPPER, above.)
FLEECING_USES = ("qmpbackup.qemu", "qmpbackup.nbd", "qmpbackup.recovery", "qmpbackup.errors",
                 "qmpbackup.jobs.storage_cfg",  # storage.cfg: where fleecing images live
                 "qmpbackup.host_command")  # the one way to run a host tool (qemu-img, lvcreate, zfs)
FLEECING_EXEMPT = {"bench.py": "the tuning tool (python -m fleecing.bench) drives the real block jobs"}


@pytest.mark.parametrize(("folder", "forbidden", "exempt"), RULES, ids=[r[0] for r in RULES])
def test_no_import_goes_the_wrong_way(folder: str, forbidden: tuple[str, ...], exempt: dict[str, str]) -> None:
    wrong = []
    for path in _modules(folder):
        if path.name in exempt:
            continue
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_compress_knows_nothing_of_qemu() -> None:
    for path in (ROOT / "qmpbackup/compress.py", ROOT / "qmpbackup/atomic_file.py", ROOT / "qmpbackup/throttle.py"):
        assert not {n for n in _imports(path) if n.startswith(("qemu", "qmpbackup.qemu", "qmpbackup.nbd"))}


def test_recovery_records_are_leaves() -> None:
    """Everyone records into the journal; the record-keeping itself knows nothing of QEMU or fleecing."""
    for name in ("journal", "kinds", "state", "spawned", "instance", "host_files"):
        path = ROOT / "qmpbackup/recovery" / f"{name}.py"
        wrong = {n for n in _imports(path) if n.startswith(("qmpbackup.", "fleecing", "qemu"))
                 and n != "qmpbackup.recovery"
                 and not n.startswith(("qmpbackup.recovery.", "qmpbackup.errors", "qmpbackup.atomic_file"))}
        wrong |= {n for n in _imports(path) if n in RECOVERY_UPPER}
        assert not wrong, f"{path.name} imports {sorted(wrong)}"


def test_fleecing_is_a_library_with_a_boundary() -> None:
    wrong = []
    for path in _modules("fleecing"):
        if path.name in FLEECING_EXEMPT:
            continue
        for name in _imports(path):
            if name.startswith("qmpbackup") and not any(name == u or name.startswith(u + ".") for u in FLEECING_USES):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
