"""The schema walker on a small hand-made introspection reply (numbered type names)."""

from __future__ import annotations

from typing import Any

from qmpbackup.qemu.schema import QmpSchema

SCHEMA: list[dict[str, Any]] = [
    {"name": "blockdev-add", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
    {"name": "blockdev-backup", "meta-type": "command", "arg-type": "5", "ret-type": "0"},
    {"name": "query-version", "meta-type": "command", "arg-type": "0", "ret-type": "9"},
    {"name": "SHUTDOWN", "meta-type": "event", "arg-type": "0"},
    {"name": "0", "meta-type": "object", "members": []},
    {"name": "1", "meta-type": "object", "tag": "driver",
     "members": [{"name": "driver", "type": "2"}, {"name": "node-name", "type": "str", "default": None}],
     "variants": [{"case": "copy-before-write", "type": "3"}, {"case": "raw", "type": "0"}]},
    {"name": "2", "meta-type": "enum", "values": ["copy-before-write", "raw", "snapshot-access"]},
    {"name": "3", "meta-type": "object",
     "members": [{"name": "target", "type": "str"}, {"name": "bitmap", "type": "4"}]},
    {"name": "4", "meta-type": "alternate", "members": [{"type": "str"}, {"type": "8"}]},
    {"name": "8", "meta-type": "object", "members": [{"name": "node", "type": "str"}, {"name": "name", "type": "str"}]},
    {"name": "5", "meta-type": "object", "members": [{"name": "x-perf", "type": "6"}, {"name": "list", "type": "7"}]},
    {"name": "6", "meta-type": "object", "members": [{"name": "max-workers", "type": "int"}]},
    {"name": "7", "meta-type": "array", "element-type": "6"},
    {"name": "int", "meta-type": "builtin", "json-type": "int"},
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
]  # fmt: skip


def test_walks_commands_variants_alternates_and_arrays() -> None:
    s = QmpSchema(SCHEMA)
    assert s.has_command("blockdev-add") and not s.has_command("SHUTDOWN") and s.has_event("SHUTDOWN")
    assert s.has_arg("blockdev-add", "node-name")
    assert s.has_arg("blockdev-add", "@copy-before-write", "target")
    assert not s.has_arg("blockdev-add", "@raw", "target")
    assert not s.has_arg("blockdev-add", "@snapshot-access", "file")  # no such variant
    assert s.has_arg("blockdev-add", "@copy-before-write", "bitmap", "node")  # through the alternate
    assert s.has_arg("blockdev-backup", "x-perf", "max-workers")
    assert not s.has_arg("blockdev-backup", "x-perf", "min-cluster-size")
    assert s.has_arg("blockdev-backup", "list", "max-workers")  # through the array
    assert not s.has_arg("no-such-command", "x")
    assert s.enum_values("blockdev-add", "driver") == {"copy-before-write", "raw", "snapshot-access"}
    assert s.enum_values("blockdev-add", "node-name") == frozenset()
    assert s.has_variant("blockdev-add", "raw") and not s.has_variant("blockdev-add", "nbd")
