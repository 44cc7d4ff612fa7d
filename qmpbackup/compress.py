"""Archive compression as vzdump does it: none, zstd, gzip (gzip or pigz), lzo (lzop).

Writing: zstd runs in-process with the ``zstandard`` library (measured faster
than the ``zstd`` command and it needs no pipe copy); gzip and lzo run vzdump's
commands as child processes that read our data on a pipe and write straight to
the destination descriptor. Every child is reaped and its exit status checked,
so a compressor that dies fails the write with its name and stderr.

Reading: the format is recognised by its magic bytes, not by the file name, so
standard input and pipes work (the first bytes are peeked and kept). zstd and
gzip are decoded in-process (zlib measured as fast as ``pigz -dc`` and twice
``gzip -dc`` here), lzo by ``lzop -dc``. Damaged or truncated input raises
CompressError; output per read is bounded, so a decompression bomb cannot
exhaust memory.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import fcntl
import logging
import os
import signal
import stat
import subprocess
import tempfile
import threading
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Final, Self


from qmpbackup.errors import QmpBackupError, StateError, UsageError
from qmpbackup.ionice import ThreadIonice, apply_ionice, io_priority
from qmpbackup.zstd_frames import FrameError, FramedZstdWriter, FrameTrackingSource

log = logging.getLogger(__name__)

ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC: Final = b"\x1f\x8b"
LZOP_MAGIC: Final = b"\x89\x4c\x5a\x4f\x00\x0d\x0a\x1a\x0a"
MAGIC_LEN: Final = len(LZOP_MAGIC)
"""Bytes :func:`open_decompressor` peeks: enough for the longest magic."""

ZSTD_LEVEL: Final = 3
"""The zstd command's default level, which vzdump uses."""
READ_CHUNK: Final = 1 << 20
"""Compressed input per read, and the most decompressed output buffered at once."""
PIPE_SIZE: Final = 1 << 20
"""Pipe capacity asked for (Linux default 64 KiB; bigger means fewer context switches)."""
CHILD_EXIT_TIMEOUT_S: Final = 120.0
"""How long a compressor may take to finish after its input is closed."""
KILL_TIMEOUT_S: Final = 10.0
FEEDER_JOIN_TIMEOUT_S: Final = 1.0
"""A feeder blocked reading a stalled pipe is left behind (a daemon thread) rather than waited for."""
CLOSE_DRAIN_LIMIT: Final = 2 * READ_CHUNK
"""Decompressed bytes ``close`` reads on to find and verify the end of the stream."""
STDERR_TAIL: Final = 4096
"""Bytes of a child's stderr kept for the error (the end, where the reason is)."""


class Compression(enum.Enum):
    """The ``compress`` choices of vzdump, by the name we use everywhere."""

    NONE = "none"
    ZSTD = "zstd"
    GZIP = "gzip"
    LZO = "lzo"

    @property
    def extension(self) -> str:
        """The archive suffix after ``.vma``: "", ".zst", ".gz" or ".lzo"."""
        return _EXTENSIONS[self]


_EXTENSIONS: Final = {Compression.NONE: "", Compression.ZSTD: ".zst", Compression.GZIP: ".gz", Compression.LZO: ".lzo"}
_COMPRESS_VALUES: Final = {
    "0": Compression.NONE,
    "none": Compression.NONE,
    "1": Compression.LZO,
    "lzo": Compression.LZO,
    "gzip": Compression.GZIP,
    "zstd": Compression.ZSTD,
}


def parse_compress(value: str) -> Compression:
    """vzdump's ``compress`` value ("0", "1", "gzip", "lzo", "zstd", and our "none"); UsageError otherwise.

    The one parser of it: the command line, vzdump.conf and jobs.cfg (through
    :mod:`qmpbackup.jobs.vzdump_conf`) and ``vma create`` accept the same values.
    """
    try:
        return _COMPRESS_VALUES[value.strip()]
    except KeyError:
        raise UsageError(f"invalid compress value {value!r}: expected 0, 1, none, lzo, gzip or zstd") from None


def detect(head: bytes) -> Compression:
    """The compression of a stream that starts with ``head`` (NONE when no magic matches)."""
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(LZOP_MAGIC):
        return Compression.LZO
    return Compression.NONE


class CompressError(QmpBackupError):
    """Compression or decompression failed; names the program and keeps its exit status and stderr."""

    def __init__(
        self, message: str, *, program: str | None = None, returncode: int | None = None, stderr: str = ""
    ) -> None:
        self.program = program
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class CompressOptions:
    """vzdump's options that shape compression.

    ``zstd_threads``: worker threads (0 = half the cores, vzdump's rule);
    ``pigz``: 0 = use gzip, 1 = pigz with half the cores, N = pigz with N threads;
    ``ionice``: 0-7 best-effort priority, 8 idle class, None = leave as is.
    """

    zstd_threads: int = 1
    pigz: int = 0
    ionice: int | None = None

    def __post_init__(self) -> None:
        if self.zstd_threads < 0:
            raise UsageError(f"invalid zstd thread count {self.zstd_threads}: expected 0 or more")
        if self.pigz < 0:
            raise UsageError(f"invalid pigz value {self.pigz}: expected 0 or more")
        if self.ionice is not None:
            io_priority(self.ionice)


def half_the_cores(cpus: int | None = None) -> int:
    """vzdump's ``int((cpus+1)/2)``."""
    count = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, (count + 1) // 2)


def zstd_thread_count(option: int, cpus: int | None = None) -> int:
    """Threads for vzdump's ``zstd`` option: N, or half the cores for 0."""
    return option if option > 0 else half_the_cores(cpus)


def compressor_command(compression: Compression, options: CompressOptions, cpus: int | None = None) -> list[str]:
    """vzdump's command line for a child compressor (gzip and lzo; zstd runs in-process)."""
    if compression is Compression.GZIP:
        if options.pigz == 0:
            return ["gzip", "--rsyncable"]
        threads = half_the_cores(cpus) if options.pigz == 1 else options.pigz
        return ["pigz", "-p", str(threads), "--rsyncable"]
    if compression is Compression.LZO:
        return ["lzop"]
    raise ValueError(f"{compression.value} has no child compressor")


# --------------------------------------------------------------------------- child processes


def _enlarge_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class _Child:
    """One compressor process: its own session (our Ctrl-C does not hit it first), stderr kept in a temp file."""

    def __init__(self, argv: list[str], *, stdin: int, stdout: int, ionice: int | None) -> None:
        self.program = argv[0]
        self._stderr = tempfile.TemporaryFile(prefix=f"qmpbackup-{self.program}-")
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv, stdin=stdin, stdout=stdout, stderr=self._stderr, close_fds=True, start_new_session=True, bufsize=0
            )
        except OSError as exc:
            self._stderr.close()
            hint = " (is it installed?)" if isinstance(exc, FileNotFoundError) else ""
            raise CompressError(
                f"cannot start {self.program}{hint}: {exc.strerror or exc}", program=self.program
            ) from exc
        self.returncode: int | None = None
        log.debug("started %s as pid %d", " ".join(argv), self.proc.pid)
        if ionice is not None:
            try:
                apply_ionice(self.proc.pid, ionice)
            except BaseException:
                self.kill()
                raise

    def stderr_text(self) -> str:
        """The end of what the child printed on stderr, as one line."""
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - STDERR_TAIL))
            text = self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())

    def wait(self, timeout: float) -> int:
        """Reap the child; kill it if it does not end within ``timeout``."""
        if self.returncode is not None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CompressError(
                f"{self.program} did not finish within {timeout:.0f} s; killed it", program=self.program
            ) from None
        return self.returncode

    def kill(self) -> None:
        """Kill the child's whole process group and reap it; safe to call twice."""
        if self.returncode is None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                self.returncode = self.proc.wait(KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) survived SIGKILL for %.0f s", self.program, self.proc.pid, KILL_TIMEOUT_S)
        self.release()

    def error(self, returncode: int, what: str = "failed") -> CompressError:
        """A CompressError describing how the child ended, with its stderr."""
        if returncode < 0:
            try:
                how = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exit status {returncode}"
        stderr = self.stderr_text()
        message = f"{self.program} {what} ({how})"
        if stderr:
            message += f": {stderr[-500:]}"
        return CompressError(message, program=self.program, returncode=returncode, stderr=stderr)

    def check(self, timeout: float = CHILD_EXIT_TIMEOUT_S) -> None:
        """Reap the child and raise CompressError unless it exited with status 0."""
        returncode = self.wait(timeout)
        if returncode != 0:
            raise self.error(returncode)

    def release(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --------------------------------------------------------------------------- writing


class _CloseOrAbort(abc.ABC):
    """``with``: ``close`` (with its checks) on success, ``abort`` when the block raised."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Compressor(_CloseOrAbort):
    """A byte sink that compresses into a destination file; use as a context manager.

    ``close`` finishes the stream (and reaps a child, checking its status);
    leaving the context with an exception calls ``abort`` instead, which kills
    a child and leaves the destination incomplete (the caller removes it).
    """

    def __init__(self, compression: Compression, ionice: int | None) -> None:
        self.compression = compression
        self._ionice = ThreadIonice(ionice)
        self._open = True

    def write(self, data: bytes | bytearray | memoryview, /) -> None:
        """Compress ``data``; the caller may reuse its buffer when this returns."""
        if not self._open:
            raise StateError(f"{self.compression.value} compressor write", "closed", "open")
        self._ionice.enter_current()
        self._write(data)

    #: Whether :meth:`write_frame` takes frames of another zstd archive (see qmpbackup.zstd_frames).
    takes_frames = False

    def end_frame(self) -> None:
        """A good place to cut the compressed stream (the VMA writer calls it between extent parts)."""

    def write_frame(self, frame: bytes | memoryview) -> None:
        """Put a complete compressed frame next in the stream (only where ``takes_frames``)."""
        raise StateError(f"{self.compression.value} compressor", "not framed", "framed")

    def frame_table(self) -> list[tuple[int, int]] | None:
        """(compressed, plain) offset of every frame written, then both ends; None when not framed.

        Everything written so far is compressed and written out first.
        """
        return None

    def write_raw(self, data: bytes | memoryview) -> None:
        """Append bytes after the compressed stream as they are (framed zstd only: a skippable frame)."""
        raise StateError(f"{self.compression.value} compressor", "not framed", "framed")

    def close(self) -> None:
        """Finish the compressed stream; raises CompressError if the compressor failed. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            self._finish()
        finally:
            self._ionice.restore()

    def abort(self) -> None:
        """Stop without finishing the stream (kills a child process). Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            self._abort()
        finally:
            self._ionice.restore()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.compression.value} {'open' if self._open else 'closed'}>"

    @abc.abstractmethod
    def _write(self, data: bytes | bytearray | memoryview) -> None: ...

    @abc.abstractmethod
    def _finish(self) -> None: ...

    @abc.abstractmethod
    def _abort(self) -> None: ...


def _write_all(dest: IO[bytes], data: bytes | bytearray | memoryview) -> None:
    """dest.write until everything is taken (raw files may take less)."""
    written = dest.write(data)
    if written is None or written >= len(data):
        return
    view = memoryview(data).cast("B")[written:]
    while len(view):
        written = dest.write(view)
        view = view[written or 0 :]


class _PlainCompressor(Compressor):
    """NONE: writes through."""

    def __init__(self, dest: IO[bytes], ionice: int | None) -> None:
        super().__init__(Compression.NONE, ionice)
        self._dest = dest

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        _write_all(self._dest, data)

    def _finish(self) -> None:
        self._dest.flush()

    def _abort(self) -> None:
        pass


class _ZstdCompressor(Compressor):
    """zstd in-process, as independent frames with content checksums (:mod:`qmpbackup.zstd_frames`)."""

    takes_frames = True

    def __init__(self, dest: IO[bytes], threads: int, ionice: int | None) -> None:
        super().__init__(Compression.ZSTD, ionice)
        self._dest = dest
        self._writer = FramedZstdWriter(dest, threads, ZSTD_LEVEL)
        log.debug("zstd level %d with %d threads", ZSTD_LEVEL, threads)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._writer.write(data)

    def end_frame(self) -> None:
        self._writer.end_frame()

    def write_frame(self, frame: bytes | memoryview) -> None:
        self._writer.write_frame(frame)

    def frame_table(self) -> list[tuple[int, int]] | None:
        return self._writer.frame_table() if self._writer.all_sized else None

    def write_raw(self, data: bytes | memoryview) -> None:
        self._writer.write_raw(data)

    def _finish(self) -> None:
        try:
            self._writer.close()
        except FrameError as exc:
            raise CompressError(str(exc), program="zstd") from exc
        self._dest.flush()

    def _abort(self) -> None:
        self._writer.abort()


class _ChildCompressor(Compressor):
    """gzip/pigz/lzop: our data goes in on a pipe, the child writes to the destination descriptor."""

    def __init__(self, dest: IO[bytes], compression: Compression, argv: list[str], ionice: int | None) -> None:
        super().__init__(compression, None)  # our thread only feeds a pipe; the child does the disk I/O
        dest.flush()
        self._child = _Child(argv, stdin=subprocess.PIPE, stdout=dest.fileno(), ionice=ionice)
        assert self._child.proc.stdin is not None
        self._pipe = self._child.proc.stdin.fileno()
        _enlarge_pipe(self._pipe)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            while len(view):
                view = view[os.write(self._pipe, view) :]
        except OSError as exc:  # BrokenPipeError: the child is gone
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self._open = False
        self._close_pipe()
        try:
            returncode = self._child.wait(KILL_TIMEOUT_S)
            if returncode == 0:
                raise CompressError(
                    f"{self._child.program} stopped reading its input: {exc.strerror or exc}",
                    program=self._child.program,
                ) from exc
            raise self._child.error(returncode) from exc
        finally:
            self._child.release()

    def _close_pipe(self) -> None:
        stdin = self._child.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()

    def _finish(self) -> None:
        self._close_pipe()
        try:
            self._child.check()
        finally:
            self._child.release()

    def _abort(self) -> None:
        self._child.kill()


def open_compressor(
    dest: IO[bytes], compression: Compression, options: CompressOptions = CompressOptions()
) -> Compressor:
    """A compressor writing ``compression`` to ``dest`` (an open binary file with a real descriptor).

    Raises CompressError when a compressor program cannot be started.
    """
    if compression is Compression.NONE:
        return _PlainCompressor(dest, options.ionice)
    if compression is Compression.ZSTD:
        return _ZstdCompressor(dest, zstd_thread_count(options.zstd_threads), options.ionice)
    return _ChildCompressor(dest, compression, compressor_command(compression, options), options.ionice)


# --------------------------------------------------------------------------- reading


class Decompressor(_CloseOrAbort):
    """A byte source of decompressed data; ``read`` returns b"" only at the (verified) end.

    Damage found while reading raises CompressError. ``close`` verifies the end
    of the stream when the consumer stopped just before it (at most
    CLOSE_DRAIN_LIMIT bytes are read on), raising CompressError for damage or for
    data left unread; ``abort`` (and leaving the context with an exception)
    stops a child process without any check. Both reap every child.
    """

    _verifies_end = True

    def __init__(self, compression: Compression) -> None:
        self.compression = compression
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._closed = False

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` decompressed bytes (fewer is possible); b"" at the end of the stream."""
        if self._closed:
            raise StateError(f"{self.compression.value} decompressor read", "closed", "open")
        if self._pos >= len(self._buf):
            if self._eof:
                return b""
            self._buf = self._next_chunk()
            self._pos = 0
            if not self._buf:
                self._eof = True
                return b""
        if n < 0 or n > len(self._buf) - self._pos:
            n = len(self._buf) - self._pos
        if self._pos == 0 and n == len(self._buf):
            data, self._buf = self._buf, b""
            return data
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def readinto(self, buffer: memoryview, /) -> int:
        """Decompress into ``buffer`` (up to its length, fewer is possible); 0 at the end of the stream.

        Saves a copy where the consumer needs the data in memory of its own
        (restore decompresses into page-aligned buffers for ``O_DIRECT``).
        """
        if self._closed:
            raise StateError(f"{self.compression.value} decompressor read", "closed", "open")
        if self._eof:
            return 0
        if self._pos < len(self._buf):
            take = min(len(buffer), len(self._buf) - self._pos)
            buffer[:take] = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            return take
        n = self._fill(buffer)
        if n == 0 and len(buffer):
            self._eof = True
        return n

    def _fill(self, buffer: memoryview) -> int:
        """Straight into ``buffer``; 0 only at the verified end (subclasses that can avoid the copy do)."""
        data = self._next_chunk(len(buffer))
        take = min(len(data), len(buffer))
        buffer[:take] = memoryview(data)[:take]
        if take < len(data):
            self._buf, self._pos = data, take
        return take

    @property
    def at_eof(self) -> bool:
        """Whether the whole stream was read and verified."""
        return self._eof

    def close(self) -> None:
        """Verify the end of the stream (see the class), then release what we started; idempotent."""
        if self._closed:
            return
        try:
            if self._verifies_end and not self._eof:
                self._drain_tail()
        finally:
            self.abort()

    def _drain_tail(self) -> None:
        left = CLOSE_DRAIN_LIMIT - (len(self._buf) - self._pos)
        self._buf, self._pos = b"", 0
        while left >= 0:
            chunk = self._next_chunk()
            if not chunk:
                self._eof = True
                return
            left -= len(chunk)
        raise CompressError(f"{self.compression.value} stream closed with decompressed data left unread")

    def abort(self) -> None:
        """Stop at once without checks (kills a child process); idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.compression.value}>"

    @abc.abstractmethod
    def _next_chunk(self, size: int = READ_CHUNK) -> bytes:
        """The next piece of output (at most about ``size``), b"" at the verified end."""

    def _release(self) -> None:
        pass


class _HeadThenSource:
    """The peeked bytes, then the rest of the source."""

    def __init__(self, head: bytes, source: IO[bytes]) -> None:
        self._head = head
        self._source = source

    def read(self, n: int = READ_CHUNK) -> bytes:
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._source.read(n)

    def readinto(self, buffer: memoryview) -> int:
        readinto = getattr(self._source, "readinto", None)
        if self._head or readinto is None:
            data = self.read(len(buffer))
            take = min(len(data), len(buffer))
            buffer[:take] = memoryview(data)[:take]
            if take < len(data):
                self._head = data[take:]
            return take
        n: int | None = readinto(buffer)
        return n or 0


class _PlainDecompressor(Decompressor):
    _verifies_end = False  # nothing to verify; unread data is the caller's business
    def __init__(self, head: bytes, source: IO[bytes]) -> None:
        super().__init__(Compression.NONE)
        self._input = _HeadThenSource(head, source)

    def read(self, n: int = -1, /) -> bytes:
        if self._closed:
            raise StateError("decompressor read", "closed", "open")
        data = self._input.read(READ_CHUNK if n < 0 else n)
        if not data and n != 0:
            self._eof = True
        return data

    def _next_chunk(self, size: int = READ_CHUNK) -> bytes:
        return self._input.read(size)

    def _fill(self, buffer: memoryview) -> int:
        return self._input.readinto(buffer)


class _ZstdDecompressor(Decompressor):
    """zstd through :class:`~qmpbackup.zstd_frames.FrameTrackingSource`, the one zstd frame parser.

    It follows the frame and block headers, so a stream cut inside a frame is an error
    (zstandard's own stream reader would report a clean end), and whole frames are
    decompressed straight into the caller's buffer by :meth:`readinto`.
    """

    def __init__(self, head: bytes, source: IO[bytes]) -> None:
        super().__init__(Compression.ZSTD)
        self._frames = FrameTrackingSource(_HeadThenSource(head, source), record=False)

    def _next_chunk(self, size: int = READ_CHUNK) -> bytes:
        try:
            return self._frames.read(size)
        except FrameError as exc:
            raise _zstd_error(exc) from exc

    def _fill(self, buffer: memoryview) -> int:
        try:
            return self._frames.readinto(buffer)
        except FrameError as exc:
            raise _zstd_error(exc) from exc


def _zstd_error(exc: FrameError) -> CompressError:
    kind = "truncated" if "truncated" in str(exc) else "corrupt"
    return CompressError(f"{kind} zstd data: {exc}", program="zstd")


class _GzipDecompressor(Decompressor):
    """gzip with zlib (CRC and length of every member checked); concatenated members allowed."""

    def __init__(self, head: bytes, source: IO[bytes]) -> None:
        super().__init__(Compression.GZIP)
        self._input = _HeadThenSource(head, source)
        self._inflate = zlib.decompressobj(wbits=31)

    def _next_chunk(self, size: int = READ_CHUNK) -> bytes:
        try:
            while True:
                inflate = self._inflate
                if inflate.unconsumed_tail:
                    data = inflate.decompress(inflate.unconsumed_tail, READ_CHUNK)
                elif inflate.eof:
                    rest = inflate.unused_data or self._input.read(READ_CHUNK)
                    if not rest:
                        return b""
                    self._inflate = zlib.decompressobj(wbits=31)
                    data = self._inflate.decompress(rest, READ_CHUNK)
                else:
                    chunk = self._input.read(READ_CHUNK)
                    data = inflate.decompress(chunk, READ_CHUNK)
                    if not chunk and not data and not inflate.eof:
                        raise CompressError("truncated gzip data: the input ends inside a member", program="gzip")
                if data:
                    return data
        except zlib.error as exc:
            raise CompressError(f"corrupt gzip data: {exc}", program="gzip") from exc


class _ChildDecompressor(Decompressor):
    """A decompressor process (``lzop -dc``): we feed it on a pipe (or hand it the file) and read its stdout."""

    def __init__(self, compression: Compression, argv: list[str], head: bytes, source: IO[bytes], start: int | None):
        super().__init__(compression)
        self._feed_error: BaseException | None = None
        self._feeder: threading.Thread | None = None
        if start is not None:
            # A regular file: rewind over the peeked bytes and let the child read it itself.
            # (lseek on the descriptor: the buffered object may only move inside its buffer.)
            stdin = source.fileno()
            os.lseek(stdin, start, os.SEEK_SET)
        else:
            stdin = subprocess.PIPE
        self._child = _Child(argv, stdin=stdin, stdout=subprocess.PIPE, ionice=None)
        assert self._child.proc.stdout is not None
        self._out = self._child.proc.stdout.fileno()
        _enlarge_pipe(self._out)
        if start is None:
            assert self._child.proc.stdin is not None
            _enlarge_pipe(self._child.proc.stdin.fileno())
            self._feeder = threading.Thread(
                target=self._feed, args=(head, source), name=f"qmpbackup-feed-{self._child.program}", daemon=True
            )
            self._feeder.start()

    def _feed(self, head: bytes, source: IO[bytes]) -> None:
        """Copy the compressed input into the child's stdin (feeder thread)."""
        stdin = self._child.proc.stdin
        assert stdin is not None
        fd = stdin.fileno()
        try:
            data = head
            while data:
                view = memoryview(data)
                while len(view):
                    view = view[os.write(fd, view) :]
                data = source.read(READ_CHUNK)
        except BrokenPipeError:
            pass  # the child stopped reading: its exit status says why
        except Exception as exc:  # noqa: BLE001 - handed to the reading thread
            self._feed_error = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _next_chunk(self, size: int = READ_CHUNK) -> bytes:
        try:
            data = os.read(self._out, size)
        except OSError as exc:
            raise CompressError(
                f"reading from {self._child.program} failed: {exc}", program=self._child.program
            ) from exc
        if data:
            return data
        if self._feeder is not None:
            self._feeder.join(KILL_TIMEOUT_S)
        returncode = self._child.wait(CHILD_EXIT_TIMEOUT_S)
        if self._feed_error is not None:
            raise CompressError(
                f"reading the compressed input failed: {self._feed_error}", program=self._child.program
            ) from self._feed_error
        if returncode != 0:
            raise self._child.error(returncode)
        return b""

    def _release(self) -> None:
        self._child.kill()
        if self._feeder is not None:
            self._feeder.join(FEEDER_JOIN_TIMEOUT_S)
            if self._feeder.is_alive():
                log.debug("feeder thread of %s still blocked in a read of the source", self._child.program)


def _read_head(source: IO[bytes]) -> bytes:
    head = b""
    while len(head) < MAGIC_LEN:
        piece = source.read(MAGIC_LEN - len(head))
        if not piece:
            break
        head += piece
    return head


def _regular_file_position(source: IO[bytes]) -> int | None:
    """Where a seekable regular file is now, or None for pipes, sockets, terminals, in-memory streams."""
    try:
        if not source.seekable() or not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            return None
        return source.tell()
    except (OSError, ValueError, AttributeError):
        return None


def open_decompressor(source: IO[bytes]) -> Decompressor:
    """A decompressing reader of ``source`` (file, pipe, standard input), format recognised by magic bytes.

    Junk that matches no magic is returned as is (NONE): the caller's format
    check rejects it. Raises CompressError when a decompressor cannot start.
    """
    start = _regular_file_position(source)
    head = _read_head(source)
    compression = detect(head)
    log.debug("input compression: %s", compression.value)
    if compression is Compression.ZSTD:
        return _ZstdDecompressor(head, source)
    if compression is Compression.GZIP:
        return _GzipDecompressor(head, source)
    if compression is Compression.LZO:
        return _ChildDecompressor(compression, ["lzop", "-dc"], head, source, start)
    return _PlainDecompressor(head, source)
