"""Dirty-bitmap incremental reads as a feature of the run (see :mod:`qmpbackup.backup.incremental`).

Handed in by the job layer for every guest: with ``dirty-bitmap 0`` it still plans (one
"full read" line, and our stale bitmaps are removed) but starts no new bitmap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmpbackup.backup.datapath import ArchiveDataPath
from qmpbackup.backup.features import NoFeature, RunContext
from qmpbackup.backup.incremental import IncrementalPlan, closing_lines, plan_incremental
from qmpbackup.backup.synthetic import complete_from_previous


class IncrementalFeature(NoFeature):
    """Reads only what changed since the previous archive; the rest comes from that archive."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._plan: IncrementalPlan | None = None
        self._reused: dict[str, int] = {}

    @property
    def plan(self) -> IncrementalPlan:
        assert self._plan is not None, "attach first"
        return self._plan

    async def attach(self, run: RunContext) -> Mapping[str, str]:
        """Decide per drive; the new bitmaps start in the transaction, or now when another
        feature takes the point in time earlier (a bitmap started early holds a few clusters
        too many, never too few)."""
        self._plan = await plan_incremental(
            run.session, run.vmid, [(d.key, d.top_node, d.size) for d in run.disks],
            dump_dir=run.dump_dir, enabled=self.enabled, new_uuid=run.archive_uuid,
            to_stdout=run.to_stdout, persistent_ok=run.caps.has_persistent_bitmaps,
            full_reason=run.full_reason)
        for line in self._plan.log_lines():
            run.log.info(line)
        if run.snapshot_in_transaction:
            self._plan.record(run.journal)
        else:
            await self._plan.start_bitmaps(run.session, run.journal)
        return {}

    def actions(self) -> list[dict[str, Any]]:
        return self.plan.actions()

    def job_args(self) -> Mapping[str, Mapping[str, Any]]:
        return self.plan.job_args()

    async def at_snapshot_point(self, run: RunContext) -> None:
        if not run.snapshot_in_transaction:
            await self.plan.bind_snapshots(run.session, run.journal, run.sources)

    async def complete_archive(self, run: RunContext, archive: ArchiveDataPath) -> int:
        self._reused = await complete_from_previous(self.plan, archive, run.session)
        return sum(self._reused.values())

    def closing_lines(self, received: Mapping[str, int]) -> list[str]:
        return closing_lines(self.plan, received, self._reused)

    async def commit(self, run: RunContext) -> list[str]:
        return await self.plan.commit(run.session, run.journal)
