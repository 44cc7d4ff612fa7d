"""A read-only export source backed by a raw image file (the archive reader's stand-in here).

``allocation`` reports 4 KiB blocks that read as zeroes, as the archive reader does, by
reading them: slow, but exact, and these test images are small.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

BLOCK = 4096
PIECE = 100_003  # odd, so pieces and socket writes never line up


class FileSource:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self.reads = 0

    def pieces(self, offset: int, length: int, /) -> list[memoryview]:
        # Handed out in uneven pieces, as an archive's frames would be: the server must send them
        # back to back whatever their sizes.
        self.reads += 1
        data = memoryview(os.pread(self._fd, length, offset))
        return [data[at:at + PIECE] for at in range(0, length, PIECE)] or [data]

    def allocation(self, offset: int, length: int, max_runs: int = 0, /) -> list[tuple[int, int, bool]]:
        # (max_runs is a limit a source may ignore: the whole range is always answered here)
        start = offset - offset % BLOCK
        end = min(self.size, offset + length)
        runs: list[tuple[int, int, bool]] = []
        pos = start
        while pos < end:
            n = min(BLOCK, self.size - pos)
            zero = not any(os.pread(self._fd, n, pos))
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
            else:
                runs.append((pos, n, zero))
            pos += n
        return runs

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def zero_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the 4 KiB-aligned zero ranges of a file, merged."""
    with FileSource(path) as src:
        return [(o, n) for o, n, zero in src.allocation(0, src.size) if zero]
