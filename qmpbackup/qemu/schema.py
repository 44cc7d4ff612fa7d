"""Walk the type graph of ``query-qmp-schema``.

QEMU's introspection hides type names (object, enum and array types are numbered,
``"299"``); only commands, events and built-in types keep real names. So a question like
"does copy-before-write take ``min-cluster-size``" has to be answered by walking:
command ``blockdev-add`` → its argument type (a union with tag ``driver``) → the variant
for case ``copy-before-write`` → its members. This module does that walk and nothing else.

Paths are sequences of steps. A step is a member name, or ``"@<case>"`` to enter the
variant of a union for that tag value. Arrays are looked through to their elements and
alternates to each of their branches, so a path succeeds if *any* branch has it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class QmpSchema:
    """An index over the list ``query-qmp-schema`` returns."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._by_name: dict[str, Mapping[str, Any]] = {}
        self._commands: dict[str, Mapping[str, Any]] = {}
        self._events: dict[str, Mapping[str, Any]] = {}
        for entry in entries:
            meta = entry.get("meta-type")
            name = str(entry.get("name"))
            if meta == "command":
                self._commands[name] = entry
            elif meta == "event":
                self._events[name] = entry
            else:
                self._by_name[name] = entry

    def has_command(self, name: str) -> bool:
        return name in self._commands

    def has_event(self, name: str) -> bool:
        return name in self._events

    def command_names(self) -> frozenset[str]:
        return frozenset(self._commands)

    def _resolve(self, type_name: str) -> list[Mapping[str, Any]]:
        """The object/enum/builtin entries a type stands for (arrays and alternates opened)."""
        out: list[Mapping[str, Any]] = []
        seen: set[str] = set()
        todo = [type_name]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            entry = self._by_name.get(name)
            if entry is None:
                continue
            meta = entry.get("meta-type")
            if meta == "array":
                todo.append(str(entry["element-type"]))
            elif meta == "alternate":
                todo.extend(str(m["type"]) for m in entry.get("members", ()))
            else:
                out.append(entry)
        return out

    def _step(self, entries: Sequence[Mapping[str, Any]], step: str) -> list[Mapping[str, Any]]:
        out: list[Mapping[str, Any]] = []
        for entry in entries:
            if entry.get("meta-type") != "object":
                continue
            if step.startswith("@"):
                case = step[1:]
                for variant in entry.get("variants", ()):
                    if variant.get("case") == case:
                        out.extend(self._resolve(str(variant["type"])))
                continue
            for member in entry.get("members", ()):
                if member.get("name") == step:
                    out.extend(self._resolve(str(member["type"])))
        return out

    def _walk(self, command: str, steps: Sequence[str]) -> list[Mapping[str, Any]] | None:
        """Entries at the end of ``steps`` from ``command``'s arguments; None if no such path."""
        cmd = self._commands.get(command)
        if cmd is None or "arg-type" not in cmd:
            return None
        entries = self._resolve(str(cmd["arg-type"]))
        for i, step in enumerate(steps):
            entries = self._step(entries, step)
            if not entries:
                return None
            if i == len(steps) - 1:
                return entries
        return entries

    def has_arg(self, command: str, *steps: str) -> bool:
        """Whether ``command`` accepts the argument at ``steps``.

        ``has_arg("blockdev-backup", "x-perf", "min-cluster-size")``,
        ``has_arg("blockdev-add", "@copy-before-write", "cbw-timeout")``.
        """
        if not steps:
            return self.has_command(command)
        return self._walk(command, steps) is not None

    def enum_values(self, command: str, *steps: str) -> frozenset[str]:
        """The values of the enum at ``steps`` of ``command``'s arguments (empty if none)."""
        entries = self._walk(command, steps) or []
        values: set[str] = set()
        for entry in entries:
            if entry.get("meta-type") == "enum":
                values.update(str(v) for v in entry.get("values", ()))
        return frozenset(values)

    def has_variant(self, command: str, case: str, *steps: str) -> bool:
        """Whether the union at ``steps`` of ``command``'s arguments has a variant ``case``."""
        entries = self._walk(command, steps) if steps else self._resolve(
            str(self._commands.get(command, {}).get("arg-type", ""))
        )
        for entry in entries or ():
            if any(v.get("case") == case for v in entry.get("variants", ())):
                return True
        return False
