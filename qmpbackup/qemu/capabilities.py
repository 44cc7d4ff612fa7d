"""What this QEMU can do, asked once per session and answered from its QMP schema.

Code decides by these flags, never by the version number: distributions backport
features, and Proxmox's QEMU has extra ones. The version is kept for log lines only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from qmpbackup.qemu.schema import QmpSchema

log = logging.getLogger(__name__)


class Executor(Protocol):
    """The one call the probe needs from a session."""

    async def execute(
        self, command: str, args: Mapping[str, object] | None = None, timeout: float | None = None
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Features of one QEMU, as its schema states them."""

    version: tuple[int, int, int]  # for log lines only
    package: str
    # copy-before-write filter and fleecing
    has_copy_before_write: bool
    has_cbw_timeout: bool
    has_on_cbw_error: bool
    has_cbw_bitmap: bool
    has_cbw_min_cluster_size: bool
    has_snapshot_access: bool
    # blockdev-backup
    has_blockdev_backup: bool
    has_backup_discard_source: bool
    has_backup_x_perf: bool
    has_backup_min_cluster_size: bool
    has_backup_filter_node_name: bool
    has_backup_auto_finalize: bool
    # NBD
    has_nbd_client: bool
    has_nbd_reconnect_delay: bool
    has_nbd_open_timeout: bool
    has_nbd_server_start: bool
    has_block_export_add: bool
    has_nbd_export_bitmaps: bool
    has_nbd_export_bitmap_node: bool  # bitmaps as {"node", "name"} (bitmap on another node)
    # bitmaps, graph changes, jobs
    has_persistent_bitmaps: bool
    has_bitmap_merge: bool
    has_blockdev_reopen: bool
    has_blockdev_create: bool
    has_transaction_blockdev_backup: bool
    has_transaction_completion_mode: bool
    has_job_finalize: bool
    has_block_graph_query: bool  # x-debug-query-block-graph, used by drive discovery

    @property
    def version_text(self) -> str:
        return ".".join(str(p) for p in self.version)

    def summary(self) -> str:
        """One log line: the version and the features that are present."""
        on = [f.name.removeprefix("has_") for f in fields(self) if f.name.startswith("has_") and getattr(self, f.name)]
        return f"QEMU {self.version_text} ({self.package or 'upstream'}): {' '.join(on)}"


def capabilities_from(schema_entries: Iterable[Mapping[str, Any]], version_reply: Mapping[str, Any]) -> Capabilities:
    """Build :class:`Capabilities` from the replies of ``query-qmp-schema`` and ``query-version``."""
    s = QmpSchema(schema_entries)
    q = version_reply.get("qemu", {})
    version = (int(q.get("major", 0)), int(q.get("minor", 0)), int(q.get("micro", 0)))
    cbw = "@copy-before-write"
    drivers = s.enum_values("blockdev-add", "driver")
    export_types = s.enum_values("block-export-add", "type")
    actions = s.enum_values("transaction", "actions", "type")
    return Capabilities(
        version=version,
        package=str(version_reply.get("package", "")).strip(),
        has_copy_before_write="copy-before-write" in drivers and s.has_arg("blockdev-add", cbw, "target"),
        has_cbw_timeout=s.has_arg("blockdev-add", cbw, "cbw-timeout"),
        has_on_cbw_error=s.has_arg("blockdev-add", cbw, "on-cbw-error"),
        has_cbw_bitmap=s.has_arg("blockdev-add", cbw, "bitmap"),
        has_cbw_min_cluster_size=s.has_arg("blockdev-add", cbw, "min-cluster-size"),
        has_snapshot_access="snapshot-access" in drivers,
        has_blockdev_backup=s.has_command("blockdev-backup"),
        has_backup_discard_source=s.has_arg("blockdev-backup", "discard-source"),
        has_backup_x_perf=s.has_arg("blockdev-backup", "x-perf"),
        has_backup_min_cluster_size=s.has_arg("blockdev-backup", "x-perf", "min-cluster-size"),
        has_backup_filter_node_name=s.has_arg("blockdev-backup", "filter-node-name"),
        has_backup_auto_finalize=s.has_arg("blockdev-backup", "auto-finalize"),
        has_nbd_client="nbd" in drivers,
        has_nbd_reconnect_delay=s.has_arg("blockdev-add", "@nbd", "reconnect-delay"),
        has_nbd_open_timeout=s.has_arg("blockdev-add", "@nbd", "open-timeout"),
        has_nbd_server_start=s.has_command("nbd-server-start"),
        has_block_export_add=s.has_command("block-export-add") and "nbd" in export_types,
        has_nbd_export_bitmaps=s.has_arg("block-export-add", "@nbd", "bitmaps"),
        has_nbd_export_bitmap_node=s.has_arg("block-export-add", "@nbd", "bitmaps", "node"),
        has_persistent_bitmaps=s.has_arg("block-dirty-bitmap-add", "persistent"),
        has_bitmap_merge=s.has_command("block-dirty-bitmap-merge"),
        has_blockdev_reopen=s.has_command("blockdev-reopen"),
        has_blockdev_create=s.has_command("blockdev-create"),
        has_transaction_blockdev_backup="blockdev-backup" in actions,
        has_transaction_completion_mode=s.has_arg("transaction", "properties", "completion-mode"),
        has_job_finalize=s.has_command("job-finalize") and s.has_command("job-dismiss"),
        has_block_graph_query=s.has_command("x-debug-query-block-graph"),
    )


async def probe(session: Executor) -> Capabilities:
    """Ask a connected QEMU for its schema and version.

    :raise QmpTimeoutError, QmpCommandError, QmpOutcomeUnknownError: from the session.
    """
    version = await session.execute("query-version")
    schema = await session.execute("query-qmp-schema")
    caps = capabilities_from(schema, version)
    log.debug("%s", caps.summary())
    return caps
