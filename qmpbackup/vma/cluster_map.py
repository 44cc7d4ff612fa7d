"""Which clusters of a device have been seen: sorted runs of consecutive clusters.

A device in an archive is mostly read front to back, so its seen clusters
form a handful of runs whatever its size: memory follows the number of gaps,
not the device size a header claims (a bitmap of a 256 TiB device would be
512 MiB, and one allocated in chunks on first touch costs 8 KiB per touch).
The runs live in small sorted blocks of flat integer arrays, so adding a
cluster anywhere costs a binary search and a short move, and a run costs 16
bytes (24 with values). All maps of one reader draw their runs from one
:class:`RunBudget`; that is the hard memory bound (docs/format.md F7).

A map can carry a value per cluster (the checksum spill uses it for the spill
slot): a run then holds clusters whose values are all -1 or count up by one.
"""

from __future__ import annotations

import bisect
from array import array

from qmpbackup.vma.errors import VmaError

MAX_RUNS = 1 << 22  # runs all maps of one reader may hold together: about 100 MiB at most
_BLOCK_RUNS = 256  # a block splits in two when it reaches twice this


class TooManyRuns(VmaError):
    """Adding a cluster would make more separate runs than the budget allows."""


class RunBudget:
    """How many runs the maps sharing it may hold together."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MAX_RUNS) -> None:
        self.limit = limit
        self.used = 0


class ClusterMap:
    """Set of cluster numbers with duplicate detection and a first-gap query.

    ``count`` is the device's cluster count (for :meth:`first_missing`);
    clusters at or past it may be added (the reader reports those itself).
    """

    __slots__ = ("_budget", "_ends", "_firsts", "_starts", "_values", "count", "runs", "seen")

    def __init__(self, count: int, *, budget: RunBudget | None = None, values: bool = False) -> None:
        self.count = count
        self.seen = 0
        self.runs = 0
        self._budget = budget
        self._firsts: list[int] = []  # first start of each block, for the block search
        self._starts: list[array[int]] = []
        self._ends: list[array[int]] = []  # exclusive
        self._values: list[array[int]] | None = [] if values else None

    def add(self, cluster: int, value: int = -1) -> bool:
        """Mark ``cluster`` seen; False if it was seen before (the caller reports the duplicate).

        :raise TooManyRuns: the cluster would start a run the budget has no room for.
        """
        ends = self._ends
        if ends and ends[-1][-1] == cluster and self._values is None:
            ends[-1][-1] = cluster + 1  # the common case: the last run grows
            self.seen += 1
            return True
        b = bisect.bisect_right(self._firsts, cluster) - 1
        i = -1
        join_pred = False
        if b >= 0:
            i = bisect.bisect_right(self._starts[b], cluster) - 1
            end = ends[b][i]
            if cluster < end:
                return False
            join_pred = end == cluster and self._follows(b, i, cluster, value)
        if b >= 0 and i + 1 < len(self._starts[b]):
            sb, si = b, i + 1
        elif b + 1 < len(self._starts):
            sb, si = b + 1, 0
        else:
            sb = si = -1
        join_succ = sb >= 0 and self._starts[sb][si] == cluster + 1 and self._precedes(sb, si, value)
        if join_pred and join_succ:
            ends[b][i] = ends[sb][si]
            self._delete(sb, si)
        elif join_pred:
            ends[b][i] = cluster + 1
        elif join_succ:
            self._starts[sb][si] = cluster
            if self._values is not None:
                self._values[sb][si] = value
            if si == 0:
                self._firsts[sb] = cluster
        else:
            self._insert(b, i + 1, cluster, value)
        self.seen += 1
        return True

    def _follows(self, b: int, i: int, cluster: int, value: int) -> bool:
        """Can ``cluster`` (with ``value``) extend run (b, i) at its end?"""
        if self._values is None:
            return True
        have = self._values[b][i]
        if have < 0:
            return value < 0
        return value >= 0 and value == have + cluster - self._starts[b][i]

    def _precedes(self, b: int, i: int, value: int) -> bool:
        """Can a cluster with ``value`` extend run (b, i) at its start?"""
        if self._values is None:
            return True
        have = self._values[b][i]
        return value < 0 if have < 0 else value >= 0 and value == have - 1

    def _insert(self, b: int, i: int, cluster: int, value: int) -> None:
        budget = self._budget
        if budget is not None:
            if budget.used >= budget.limit:
                raise TooManyRuns(f"more than {budget.limit} separate runs of clusters")
            budget.used += 1
        self.runs += 1
        if b < 0:  # before every run: into the first block
            b, i = 0, 0
            if not self._starts:
                self._firsts.append(cluster)
                self._starts.append(array("q"))
                self._ends.append(array("q"))
                if self._values is not None:
                    self._values.append(array("q"))
        self._starts[b].insert(i, cluster)
        self._ends[b].insert(i, cluster + 1)
        if self._values is not None:
            self._values[b].insert(i, value)
        if i == 0:
            self._firsts[b] = cluster
        if len(self._starts[b]) >= 2 * _BLOCK_RUNS:
            self._split(b)

    def _split(self, b: int) -> None:
        lists = [self._starts, self._ends] + ([self._values] if self._values is not None else [])
        for blocks in lists:
            block = blocks[b]
            blocks.insert(b + 1, block[_BLOCK_RUNS:])
            del block[_BLOCK_RUNS:]
        self._firsts.insert(b + 1, self._starts[b + 1][0])

    def _delete(self, b: int, i: int) -> None:
        if self._budget is not None:
            self._budget.used -= 1
        self.runs -= 1
        lists = [self._starts, self._ends] + ([self._values] if self._values is not None else [])
        for blocks in lists:
            del blocks[b][i]
        if not self._starts[b]:
            for blocks in lists:
                del blocks[b]
            del self._firsts[b]
        elif i == 0:
            self._firsts[b] = self._starts[b][0]

    def __contains__(self, cluster: int) -> bool:
        b = bisect.bisect_right(self._firsts, cluster) - 1
        if b < 0:
            return False
        i = bisect.bisect_right(self._starts[b], cluster) - 1
        return cluster < self._ends[b][i]

    def first_run(self) -> tuple[int, int, int] | None:
        """The lowest run as ``(start, end, value of start)``, or None when empty."""
        if not self._starts:
            return None
        value = self._values[0][0] if self._values is not None else -1
        return self._starts[0][0], self._ends[0][0], value

    def pop_first(self) -> None:
        """Forget the lowest run (its clusters no longer count as seen)."""
        self.seen -= self._ends[0][0] - self._starts[0][0]
        self._delete(0, 0)

    def release(self) -> None:
        """Forget everything and give the runs back to the budget."""
        while self._starts:
            self.pop_first()

    def first_missing(self) -> int | None:
        """The lowest cluster in ``[0, count)`` not seen, or None."""
        if self.count <= 0:
            return None
        if not self._starts or self._starts[0][0] > 0:
            return 0
        end = self._ends[0][0]
        return end if end < self.count else None
