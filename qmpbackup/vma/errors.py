"""Errors of the VMA layer: one base class, one for broken archives (docs/format.md "Reader checks")."""

from __future__ import annotations

from qmpbackup.errors import QmpBackupError


class VmaError(QmpBackupError):
    """Something about a VMA archive went wrong: a broken archive, or the writer used wrongly."""


class VmaFormatError(VmaError):
    """The reader found a rule of the format broken.

    ``offset`` is the archive byte offset where the offending structure starts
    (None when the rule is about the archive as a whole); ``rule`` is the short
    rule text without the location, so tests and callers can match on it.
    """

    def __init__(self, rule: str, offset: int | None) -> None:
        self.rule = rule
        self.offset = offset
        where = f" (at byte {offset})" if offset is not None else ""
        super().__init__(f"{rule}{where}")
