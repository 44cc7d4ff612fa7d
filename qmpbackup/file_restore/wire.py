"""The helper channel's framing, shared by the host and the service in the helper VM.

A request is one JSON object on one line (host to helper). A reply is a row of frames, each a
kind byte, a 4-byte big-endian length and the payload: ``H`` a JSON header, ``D`` data,
``E`` the JSON end (``{"ok": true}`` or ``{"error": "...", "code": "..."}``). Every reply ends
with exactly one ``E`` frame, so the host always knows where the next reply starts, and data
can stream without knowing its size beforehand. Standard library only: this file also runs
inside the helper.
"""

from __future__ import annotations

import json
import struct
from typing import Any

FRAME = struct.Struct(">cI")
HEAD, DATA, END = b"H", b"D", b"E"
KINDS = (HEAD, DATA, END)
MAX_PAYLOAD = 4 << 20
MAX_REQUEST = 64 << 10
PORT_NAME = "org.qmpbackup.file-restore.0"


class WireError(Exception):
    """The other side broke the framing (a bug or a dead peer, never a user error)."""


def frame(kind: bytes, payload: bytes) -> bytes:
    if kind not in KINDS or len(payload) > MAX_PAYLOAD:
        raise WireError(f"bad frame {kind!r} of {len(payload)} bytes")
    return FRAME.pack(kind, len(payload)) + payload


def json_frame(kind: bytes, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(raw: bytes) -> tuple[bytes, int]:
    kind, length = FRAME.unpack(raw)
    if kind not in KINDS or length > MAX_PAYLOAD:
        raise WireError(f"bad frame header {raw.hex()}")
    return kind, length


def request_line(obj: dict[str, Any]) -> bytes:
    line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise WireError("request too long")
    return line


def parse_request(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise WireError(f"request is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise WireError("request has no op")
    return obj
