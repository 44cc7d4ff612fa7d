"""Backup notes: the ``<archive>.notes`` sidecar and vzdump's ``notes-template``.

Proxmox shows the first line of the notes in its backup list, so we store them
the same way (UTF-8 text beside the archive; no file when there are no notes).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from qmpbackup.errors import QmpBackupError, UsageError
from qmpbackup.store.names import notes_name

log = logging.getLogger(__name__)

TEMPLATE_VARIABLES = ("cluster", "guestname", "node", "vmid")
_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_VARIABLE = re.compile(r"\{\{(" + "|".join(TEMPLATE_VARIABLES) + r")\}\}")


class NotesError(QmpBackupError):
    """The notes file cannot be read or written."""


class NotesTemplateError(UsageError):
    """A notes template uses an escape vzdump does not know."""


def render_notes(template: str, cluster: str | None, guestname: str | None, node: str, vmid: int | str) -> str:
    """Expand a vzdump ``notes-template``: ``\\n`` and ``\\\\`` escapes, then ``{{var}}``.

    As vzdump renders them: no cluster is ``standalone node``, no name is ``VM <vmid>``.

    Escapes are resolved first, so a guest name containing a backslash is kept as is.
    Unknown ``{{…}}`` text is left alone, as vzdump does.
    """

    def unescape(m: re.Match[str]) -> str:
        char = m.group(1)
        if char == "\\":
            return "\\"
        if char == "n":
            return "\n"
        shown = char if char else "end of text"
        raise NotesTemplateError(f"notes-template: unexpected escape character '{shown}'")

    text = _ESCAPE.sub(unescape, template)
    values = {"cluster": cluster or "standalone node", "guestname": guestname or f"VM {vmid}", "node": node,
              "vmid": str(vmid)}
    return _VARIABLE.sub(lambda m: values[m.group(1)], text)


def read_notes(archive: Path) -> str | None:
    """The notes of a backup, or None when it has none."""
    path = notes_name(archive)
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NotesError(f"cannot read notes {path}: {exc.strerror}") from exc


def first_line(notes: str | None) -> str:
    return notes.splitlines()[0] if notes and notes.strip() else ""


def write_notes(archive: Path, text: str) -> None:
    """Replace the notes (atomically); empty text removes the notes file."""
    path = notes_name(archive)
    if not text:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise NotesError(f"cannot remove notes {path}: {exc.strerror}") from exc
        return
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise NotesError(f"cannot write notes {path}: {exc.strerror}") from exc
    log.debug("wrote notes %s", path)
