"""QGA framing: newline-terminated JSON objects, plus the 0xFF sync sentinel.

Kept apart from the client so the byte-level rules (what is skipped, what is an
error) can be read in one place. qemu-ga has no greeting and matches replies to
requests only by order; ``guest-sync-delimited`` prefixes its reply with 0xFF,
a byte that never occurs in UTF-8 JSON, so scanning for it is safe.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

SENTINEL = b"\xff"
MAX_REPLY_BYTES = 64 * 1024 * 1024  # guest-file-read replies can be large; anything beyond is garbage
_READ_CHUNK = 64 * 1024


class ReplyStreamClosed(Exception):
    """The agent side closed the connection."""


class ReplyTooLarge(Exception):
    """A reply line grew beyond MAX_REPLY_BYTES."""


def encode_request(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One request line; the agent needs no id (replies come back in order)."""
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


def parse_line(line: bytes) -> dict[str, Any] | None:
    """Decode one reply line; None for a blank line.

    Leading 0xFF bytes (a delimited sync reply) are stripped. Raises ValueError
    for anything that is not a JSON object.
    """
    text = line.lstrip(SENTINEL).strip()
    if not text:
        return None
    value = json.loads(text.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"reply is a {type(value).__name__}, not an object")
    return value


class ReplyReader:
    """Buffered reader over the agent stream with the two reads QGA needs."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()

    async def _fill(self) -> None:
        chunk = await self._reader.read(_READ_CHUNK)
        if not chunk:
            raise ReplyStreamClosed("connection closed by the agent side")
        self._buf += chunk

    async def skip_past_sentinel(self) -> int:
        """Drop everything up to and including the next 0xFF; return how many bytes were dropped."""
        dropped = 0
        while True:
            pos = self._buf.find(SENTINEL)
            if pos >= 0:
                dropped += pos
                del self._buf[: pos + 1]
                return dropped
            dropped += len(self._buf)
            self._buf.clear()
            await self._fill()

    async def line(self) -> bytes:
        """The next newline-terminated line, without the newline."""
        start = 0
        while True:
            pos = self._buf.find(b"\n", start)
            if pos >= 0:
                line = bytes(self._buf[:pos])
                del self._buf[: pos + 1]
                return line
            if len(self._buf) > MAX_REPLY_BYTES:
                self._buf.clear()
                raise ReplyTooLarge(f"reply longer than {MAX_REPLY_BYTES} bytes")
            start = len(self._buf)
            await self._fill()
