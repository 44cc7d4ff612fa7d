"""The one hand-off between a pipeline's own thread and a helper thread, and the one stall policy.

Five places overlap I/O with other work through a helper: archive writes
(:mod:`qmpbackup.atomic_file`), O_DIRECT archive reads (:mod:`qmpbackup.direct_input`),
the restore read-ahead (:mod:`qmpbackup.restore.prefetch`), the previous archive's reader
(:mod:`qmpbackup.backup.synthetic`) and the restore image writes
(:mod:`qmpbackup.restore.raw_image`). They all hand items over through :class:`Handoff`,
so they all wait and stall the same way:

* The *owner* (the thread that runs the pipeline and closes the hand-off) waits for the
  helper's work (an item read, room made by a write, the end of the writes) for at most
  :data:`STALL_S` without progress, then raises :class:`Stalled`. A 4 MiB read or write
  that takes longer is a stuck disk, a dead network file system or a hung pipe; a backup
  (which keeps the VM's copy-before-write filter in place meanwhile) and a restore fail
  alike instead of hanging.
* The *helper* waits for the owner without a deadline: the owner sets the pace, and
  :meth:`Handoff.close` ends those waits at once.
* Nobody polls: every change wakes the side waiting for it.
* A helper's error reaches the owner through :meth:`Handoff.fail`; it is raised from the
  owner's next wait (when the owner consumes, after the items queued before it).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from qmpbackup.errors import QmpBackupError

log = logging.getLogger(__name__)

STALL_S: Final = 300.0
"""How long the owner waits for its helper without any progress before giving up."""
STOP_TIMEOUT_S: Final = 30.0
"""How long :meth:`Handoff.stop` waits for a helper busy in a read or write before leaving it behind."""

T = TypeVar("T")


class Stalled(QmpBackupError):
    """The helper made no progress for :data:`STALL_S` (exit 1)."""

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        super().__init__(f"{what} stalled: no progress for {seconds:.0f} s")


class Owner(enum.Enum):
    """Which end of the queue the owner's thread is: its waits on the other end carry the deadline."""

    PRODUCER = "producer"
    CONSUMER = "consumer"


class Handoff(Generic[T]):
    """A FIFO of at most ``depth`` items between the owner and its helper (one thread or several).

    ``what`` names the helper's work in the :class:`Stalled` message ("writing X").
    A consumer that holds on to an item until it asks for the next one may share a ring of
    ``depth + 2`` buffers with its producer: the producer refills a buffer only after the
    consumer has asked for the item after it.
    """

    def __init__(self, depth: int, what: str, *, owner: Owner) -> None:
        if depth < 1:
            raise ValueError("a hand-off holds at least one item")
        self.what = what
        self._depth = depth
        self._owner = owner
        self._cond = threading.Condition()
        self._items: collections.deque[T] = collections.deque()
        self._unfinished = 0  # items put and not yet marked done (for join)
        self._finished = False  # the producer has no more items
        self._closed = False  # the owner has stopped: every wait returns
        self._error: BaseException | None = None
        self._changes = 0  # counts the helper's progress, for the owner's deadline
        self._thread: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Queue ``item``, waiting while the queue is full; False (nothing queued) once closed.

        For an owning producer: raises the helper's error, and :class:`Stalled`.
        """
        with self._cond:
            if self._owner is Owner.PRODUCER:
                self._owner_wait(lambda: len(self._items) < self._depth, errors_first=True)
            else:
                while len(self._items) >= self._depth and not self._closed:
                    self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._unfinished += 1
            self._progress()
            return True

    def get(self) -> T | None:
        """The next item; None once the producer has finished and all is taken, or once closed.

        For an owning consumer: the helper's error after the items queued before it, and
        :class:`Stalled`.
        """
        with self._cond:
            if self._owner is Owner.CONSUMER:
                self._owner_wait(lambda: bool(self._items) or self._finished or self._error is not None,
                                 errors_first=False)  # the error comes after the items before it
            else:
                while not self._items and not self._finished and not self._closed:
                    self._cond.wait()
            return self._pop()

    async def get_async(self) -> T | None:
        """:meth:`get` for the event loop: it waits in a worker thread, so signals still get through."""
        with self._cond:
            if self._items or self._finished or self._closed or self._error is not None:
                return self._pop()
        return await asyncio.to_thread(self.get)

    def _pop(self) -> T | None:
        if self._items:
            item = self._items.popleft()
            self._progress()
            return item
        if self._error is not None and self._owner is Owner.CONSUMER and not self._closed:
            raise self._error
        return None

    def done(self) -> None:
        """The consumer has dealt with one item it got (see :meth:`join`)."""
        with self._cond:
            self._unfinished -= 1
            self._progress()

    def join(self) -> None:
        """Owner: wait until the consumer has marked every item done; raises its error, :class:`Stalled`."""
        with self._cond:
            self._owner_wait(lambda: self._unfinished == 0, errors_first=True)

    def finish(self) -> None:
        """The producer has no more items: the consumer gets None after the queued ones."""
        with self._cond:
            self._finished = True
            self._progress()

    def fail(self, exc: BaseException) -> None:
        """The helper failed: ``exc`` goes to the owner (see the module docstring)."""
        with self._cond:
            if self._error is None:
                self._error = exc
            self._progress()

    def close(self) -> None:
        """Owner: stop. The helper's waits return at once (put False, get None); queued items are dropped."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    def raise_error(self) -> None:
        """Raise the helper's error, if it failed."""
        if self._error is not None:
            raise self._error

    def start(self, work: Callable[[], None], name: str) -> None:
        """Run ``work`` in a daemon helper thread; its exception goes to :meth:`fail`, its return to :meth:`finish`."""

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # handed to the owner and raised there
                self.fail(exc)
            else:
                self.finish()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Owner: :meth:`close`, then wait for the helper thread; False if it is still busy after
        :data:`STOP_TIMEOUT_S` (blocked in a read or write): it is left behind, a daemon."""
        self.close()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("%s: helper thread still busy after %.0f s; leaving it behind", self.what, STOP_TIMEOUT_S)
            return False
        return True

    def _progress(self) -> None:
        self._changes += 1
        self._cond.notify_all()

    def _owner_wait(self, ready: Callable[[], bool], *, errors_first: bool) -> None:
        """Wait (holding the lock) until ``ready``, closed, or the helper failed; Stalled after STALL_S idle."""
        deadline = time.monotonic() + STALL_S
        seen = self._changes
        while not self._closed:
            if errors_first:
                self.raise_error()
            if ready():
                return
            if self._thread is not None and not self._thread.is_alive():
                raise QmpBackupError(f"{self.what}: the helper thread ended with work left")  # a bug
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stalled(self.what, STALL_S)
            self._cond.wait(left)
            if self._changes != seen:
                seen = self._changes
                deadline = time.monotonic() + STALL_S
