"""The freeze window: freeze the guest's filesystems, run the caller's block, thaw.

Why a context manager: a frozen guest whose thaw was forgotten is an outage, so
the thaw must follow *every* freeze attempt, whatever failed: the freeze
command timing out or erroring, the caller's block raising, the task being
cancelled (the thaw runs shielded and then the cancellation continues), or the
connection dropping (a disconnect never counts as a thaw: we reconnect and
thaw, and check the status). If the guest cannot be thawed, GuestThawError is
raised: loud, and never hidden behind the block's own error.

The bounds are vzdump's: guest-ping 3 s; a guest that does
not answer is backed up without a freeze ("agent configured but not running?");
guest-fsfreeze-freeze gets 600 s, then up to 5 guest-fsfreeze-status polls of 600 s
each must see "frozen", otherwise we give up; guest-fsfreeze-thaw gets 180 s.

Unlike vzdump, a guest that is already frozen when the window opens is thawed first
(``FreezeOutcome.thawed_first``) and then frozen as usual: the callers hold the VM's
journal lock, so that freeze belongs to no live run of ours; it is what a run that was
killed inside its window left behind. :func:`thaw_left_frozen` is the journal's step for a
recorded freeze (kind ``freeze``, :mod:`qmpbackup.recovery.kinds`): thaw if still frozen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from qmpbackup.guest_agent.client import AgentState, FreezeStatus, GuestAgentClient
from qmpbackup.guest_agent.errors import (
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
    GuestFreezeError,
    GuestThawError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FreezeTimeouts:
    """Limits in seconds; defaults are vzdump's. Tests pass small ones."""

    ping_s: float = 3.0
    status_s: float = 5.0
    freeze_s: float = 600.0
    status_polls: int = 5
    status_poll_s: float = 600.0
    thaw_s: float = 180.0
    thaw_attempts: int = 3
    reconnect_s: float = 10.0
    retry_pause_s: float = 1.0


@dataclass(slots=True)
class FreezeOutcome:
    """What happened in the window, for the backup log and the caller's decisions.

    ``frozen`` is True while the block runs only if the guest really is frozen
    by us. ``skipped`` says why no freeze was attempted; ``error`` why an
    attempt failed (the guest was thawed again); ``thawed_first`` that the guest
    was found frozen (by a run that died) and thawed before our freeze.
    Durations are in seconds.
    """

    frozen: bool = False
    attempted: bool = False
    skipped: str | None = None
    error: str | None = None
    filesystems: int = 0
    freeze_s: float | None = None
    thaw_s: float | None = None
    frozen_for_s: float | None = None
    thawed: bool = False
    thawed_first: bool = False


@asynccontextmanager
async def frozen_window(agent: GuestAgentClient, *, timeouts: FreezeTimeouts = FreezeTimeouts(),
                        strict: bool = False) -> AsyncIterator[FreezeOutcome]:
    """Freeze → yield FreezeOutcome → thaw, with the guarantees described in the module doc.

    ``agent`` may be connected or not (it is connected with the ping limit).
    Without ``strict``, a missing agent or a failed freeze are recorded on the
    outcome and logged, and the block runs unfrozen (vzdump's behaviour). With
    ``strict`` they raise GuestFreezeError instead (after the thaw). Raises
    GuestThawError when a thaw was needed and failed, also the thaw of a guest
    found frozen.
    """
    outcome = FreezeOutcome()
    reason = await _check_agent(agent, timeouts, outcome)
    if reason is not None:
        outcome.skipped = reason
        if strict:
            raise GuestFreezeError(f"{agent.where}: cannot freeze: {reason}", target=agent.name,
                                   socket_path=agent.socket_path, command="guest-fsfreeze-freeze")
        log.warning("%s: skipping guest filesystem freeze - %s", agent.name, reason)
        yield outcome
        return

    outcome.attempted = True
    failure: GuestAgentError | None = None
    try:
        await _freeze(agent, timeouts, outcome)
    except GuestAgentError as exc:
        failure = exc
    except BaseException as exc:
        # cancelled (or a bug) while freezing: the guest may freeze anyway, so thaw first
        await _thaw_then_reraise(agent, timeouts, outcome, exc)
        raise
    if failure is not None:
        outcome.error = str(failure)
        log.error("%s: guest filesystem freeze failed - %s", agent.name, failure)
        await _thaw_shielded(agent, timeouts, outcome)
        if strict:
            raise GuestFreezeError(f"{agent.where}: freeze failed (guest thawed again): {failure}",
                                   target=agent.name, socket_path=agent.socket_path,
                                   command=failure.command) from failure
        yield outcome
        return

    outcome.frozen = True
    frozen_at = time.monotonic()
    try:
        yield outcome
    except BaseException as exc:
        await _thaw_then_reraise(agent, timeouts, outcome, exc)
        raise
    else:
        await _thaw_shielded(agent, timeouts, outcome)
    finally:
        outcome.frozen = False
        outcome.frozen_for_s = time.monotonic() - frozen_at


async def _thaw_then_reraise(agent: GuestAgentClient, timeouts: FreezeTimeouts,
                             outcome: FreezeOutcome, exc: BaseException) -> None:
    """Thaw after ``exc``; the caller re-raises ``exc`` unless the thaw failed.

    A failed thaw wins over an ordinary error (a guest left frozen is worse;
    ``exc`` stays chained as its context), but never over a cancellation,
    which must keep unwinding: then the thaw failure is logged as CRITICAL.
    """
    try:
        await _thaw_shielded(agent, timeouts, outcome)
    except GuestThawError as thaw_exc:
        if isinstance(exc, Exception):
            raise
        log.critical("%s: %s", agent.name, thaw_exc)


async def _check_agent(agent: GuestAgentClient, timeouts: FreezeTimeouts,
                       outcome: FreezeOutcome) -> str | None:
    """None if a freeze should be attempted, else the reason to skip it; thaws a frozen guest."""
    try:
        if agent.state is AgentState.DISCONNECTED:
            await agent.connect(timeout=timeouts.ping_s)
        await agent.ping(timeout=timeouts.ping_s)
    except GuestAgentError as exc:
        return f"agent configured but not running? ({exc})"
    try:
        status = await agent.fsfreeze_status(timeout=timeouts.status_s)
    except GuestAgentError as exc:
        return f"cannot read freeze status ({exc})"
    if status is FreezeStatus.FROZEN:
        log.debug("%s: found frozen, thawing before the freeze", agent.name)
        await _thaw_shielded(agent, timeouts, FreezeOutcome())
        outcome.thawed_first = True
    return None


async def _freeze(agent: GuestAgentClient, timeouts: FreezeTimeouts, outcome: FreezeOutcome) -> None:
    """Freeze, or raise a GuestAgentError saying why the guest did not end up frozen."""
    started = time.monotonic()
    log.info("%s: issuing guest-agent 'fs-freeze' command", agent.name)
    try:
        outcome.filesystems = await agent.fsfreeze_freeze(timeout=timeouts.freeze_s)
    except GuestAgentTimeoutError as timeout_exc:
        await _wait_frozen(agent, timeouts, timeout_exc)
    outcome.freeze_s = time.monotonic() - started
    log.debug("%s: %d filesystems frozen in %.3f s", agent.name, outcome.filesystems,
              outcome.freeze_s)


async def _wait_frozen(agent: GuestAgentClient, timeouts: FreezeTimeouts,
                       cause: GuestAgentTimeoutError) -> None:
    """After a freeze timeout: poll the status (each poll waits for the agent to finish)."""
    for poll in range(timeouts.status_polls):
        left = (timeouts.status_polls - poll) * timeouts.status_poll_s
        log.warning("%s: still waiting on guest fs freeze - timeout in %.0f s", agent.name, left)
        try:
            status = await agent.fsfreeze_status(timeout=timeouts.status_poll_s)
        except GuestAgentTimeoutError:
            continue
        if status is FreezeStatus.FROZEN:
            return
        raise GuestFreezeError(f"{agent.where}: freeze timed out and the guest is {status.value}",
                               target=agent.name, socket_path=agent.socket_path,
                               command="guest-fsfreeze-freeze") from cause
    raise GuestFreezeError(
        f"{agent.where}: gave up on guest-fsfreeze-freeze after "
        f"{timeouts.freeze_s + timeouts.status_polls * timeouts.status_poll_s:g} s",
        target=agent.name, socket_path=agent.socket_path, command="guest-fsfreeze-freeze") from cause


async def _thaw_shielded(agent: GuestAgentClient, timeouts: FreezeTimeouts,
                         outcome: FreezeOutcome) -> None:
    """Run the thaw to its end even if we are cancelled meanwhile; then re-raise the cancel."""
    task = asyncio.create_task(_thaw(agent, timeouts, outcome), name=f"thaw {agent.name}")
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # unlike shield(), never raises the task's own error
        except asyncio.CancelledError:
            cancelled = True
            if not task.done():
                log.warning("%s: cancelled while thawing; finishing the thaw first", agent.name)
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s: %s", agent.name, task.exception())
        raise asyncio.CancelledError()
    task.result()


async def _thaw(agent: GuestAgentClient, timeouts: FreezeTimeouts, outcome: FreezeOutcome) -> int:
    """Thaw and confirm the status; reconnect on a lost connection. Raises GuestThawError.

    Returns how many filesystems the agent thawed.
    """
    started = time.monotonic()
    last: GuestAgentError | None = None
    log.info("%s: issuing guest-agent 'fs-thaw' command", agent.name)
    for attempt in range(1, timeouts.thaw_attempts + 1):
        if attempt > 1:
            await asyncio.sleep(timeouts.retry_pause_s)
        try:
            if agent.state is AgentState.DISCONNECTED:
                log.warning("%s: reconnecting to thaw (attempt %d)", agent.name, attempt)
                await agent.connect(timeout=timeouts.reconnect_s)
            thawed = await agent.fsfreeze_thaw(timeout=timeouts.thaw_s)
            status = await agent.fsfreeze_status(timeout=timeouts.status_s)
        except GuestAgentCommandError as exc:
            last = exc  # the agent refused; the next attempt asks again and checks the status
            log.warning("%s: thaw attempt %d failed: %s", agent.name, attempt, exc)
            continue
        except GuestAgentError as exc:
            last = exc
            log.warning("%s: thaw attempt %d failed: %s", agent.name, attempt, exc)
            if agent.state is not AgentState.DISCONNECTED and not isinstance(exc, GuestAgentTimeoutError):
                await agent.close()
            continue
        if status is FreezeStatus.THAWED:
            outcome.thawed = True
            outcome.thaw_s = time.monotonic() - started
            log.debug("%s: thawed %d filesystems in %.3f s", agent.name, thawed, outcome.thaw_s)
            return thawed
        last = GuestThawError(f"{agent.where}: still frozen after guest-fsfreeze-thaw",
                              target=agent.name, socket_path=agent.socket_path,
                              command="guest-fsfreeze-thaw")
    detail = str(last).removeprefix(f"{agent.where}: ")
    raise GuestThawError(
        f"{agent.where}: could not thaw after {timeouts.thaw_attempts} attempts, guest filesystems "
        f"may still be frozen (run guest-fsfreeze-thaw by hand): {detail}",
        target=agent.name, socket_path=agent.socket_path, command="guest-fsfreeze-thaw") from last


async def thaw_left_frozen(socket_path: str, name: str, *,
                           timeouts: FreezeTimeouts = FreezeTimeouts()) -> int:
    """Thaw a guest a dead run left frozen; returns the filesystems thawed (0: it was not frozen).

    A socket without a listener means its QEMU is gone, and the freeze with it (0).
    Raises GuestAgentError when the agent cannot be asked (a paused VM, a busy socket).
    """
    agent = GuestAgentClient(socket_path, name=name)
    try:
        await agent.connect(timeout=timeouts.reconnect_s)
    except GuestAgentUnavailableError as exc:
        if isinstance(exc.__cause__, (FileNotFoundError, ConnectionRefusedError)):
            return 0
        raise
    try:
        if await agent.fsfreeze_status(timeout=timeouts.status_s) is not FreezeStatus.FROZEN:
            return 0
        return max(1, await _thaw(agent, timeouts, FreezeOutcome()))
    finally:
        await agent.close()
