"""Every upstream prune vector (the test suites of Proxmox Backup Server and pve-storage) passes."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

from qmpbackup.store.names import parse_backup_name
from qmpbackup.store.prune import BackupRecord, Mark, PruneOptions, compute_marks, mark_group

# A byte copy of the upstream vectors (see the file's "sources"); no vector is self-computed.
VECTORS = Path(__file__).with_name("data") / "prune-vectors.json"
DATA: dict[str, Any] = json.loads(VECTORS.read_text())
UTC = timezone.utc


def options_of(raw: dict[str, int]) -> PruneOptions:
    # upstream's typo 'keep-monthyl' (always 0) is ignored, as Perl ignores unknown keys
    known: dict[str, Any] = {k.replace("-", "_"): v for k, v in raw.items() if k != "keep-monthyl"}
    return PruneOptions(**known)


def pbs_cases() -> list[Any]:
    cases: list[Any] = DATA["suites"]["pbs"]["cases"]
    return cases


def pve_cases() -> list[Any]:
    cases: list[Any] = DATA["suites"]["pve"]["cases"]
    return cases


@pytest.mark.parametrize("case", pbs_cases(), ids=lambda c: c["id"])
def test_pbs_vector(case: dict[str, Any]) -> None:
    items = DATA["suites"]["pbs"]["lists"][case["list"]]
    records = [BackupRecord(i["snapshot"], i["epoch"], i["protected"]) for i in items]
    marks = compute_marks(records, options_of(case["options"]), UTC)
    kept = [i["snapshot"] for i in items if marks[i["snapshot"]] is not Mark.REMOVE]
    removed = [i["snapshot"] for i in items if marks[i["snapshot"]] is Mark.REMOVE]
    assert kept == case["kept"]
    assert removed == case["removed"]


@pytest.mark.parametrize("case", pve_cases(), ids=lambda c: c["id"])
def test_pve_vector(case: dict[str, Any]) -> None:
    items = DATA["suites"]["pve"]["lists"][case["list"]]
    groups: dict[tuple[str, int], list[BackupRecord]] = defaultdict(list)
    result: dict[str, Mark] = {}
    for item in items:
        volid = item["volid"]
        parsed = parse_backup_name(volid.split("/", 1)[1])
        vmtype = parsed.vmtype if parsed else "unknown"
        if case["vmid"] is not None and item.get("vmid") != case["vmid"]:
            continue
        if case["type"] is not None and vmtype != case["type"]:
            continue
        if parsed is None:
            result[volid] = Mark.RENAMED
            continue
        rec = BackupRecord(volid, parsed.epoch(UTC), item["protected"])
        assert rec.ctime == item["ctime"]
        groups[(parsed.vmtype, parsed.vmid)].append(rec)
    for records in groups.values():
        result.update(mark_group(records, options_of(case["options"]), UTC))  # type: ignore[arg-type]
    expected = {e["volid"]: e["mark"] for e in case["expected"]}
    assert {k: str(v) for k, v in result.items()} == expected


def test_vector_counts() -> None:
    assert len(pbs_cases()) == 22
    assert len(pve_cases()) == 22
