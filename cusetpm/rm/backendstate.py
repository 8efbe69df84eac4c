"""A TPM that goes away and comes back: the RM's "backend down" state.

A transport failure (swtpm killed or its socket closed, a /dev/tpmN read or write failing, a
TPM answering TPM_RC_INITIALIZE because it was power-cycled) fails the command in flight with
EIO, as before. Then the RM tries at once to reach the TPM again (Backend.reopen() and one
TPM2_ReadClock). If that fails the backend is *down*:

- commands (queued, or written later on open descriptors) get EIO; each first makes one
  quick attempt to reconnect, so they never hang and never get a wrong answer;
- new opens get ENODEV, the message naming the backend;
- a thread retries every 0.1 s, doubling to 5 s (RMConfig.reopen_*), until the TPM answers.

Whenever the TPM is reached again, TPM2_ReadClock tells whether it restarted meanwhile
(TPM_RC_INITIALIZE: the RM sends TPM2_Startup(SU_CLEAR); resetCount or restartCount changed;
or the clock went backwards, a state restored from an older copy). If it did, every context
the RM saved is useless: Executor.after_tpm_restart() forgets them (their owners get the
documented codes, see README "When the TPM goes away") and the baseline of handles present
is read again. Persistent handles and NV live in the TPM's own state and are not touched.

Every method but check_open() and stop() runs for whoever holds the manager's `_current` (it
talks to the TPM and changes the RM's tables); the reopen thread gets there through a queued
RM job.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cusetpm.backends.base import BackendError
from cusetpm.rm.errors import RMError
from cusetpm.rm.space import Space
from cusetpm.rm.tpmlink import TpmNotStarted
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_HT, TPM_ST, TPM_SU
from cusetpm.tpm.rc import TPM_RC, rc_name

if TYPE_CHECKING:
    from cusetpm.rm.manager import ResourceManager

log = logging.getLogger(__name__)

_READ_CLOCK = struct.pack(">HII", TPM_ST.NO_SESSIONS, 10, TPM_CC.ReadClock)
# TPMS_TIME_INFO: time (u64), clockInfo: clock (u64), resetCount, restartCount (u32), safe (u8)
_TIME_INFO = struct.Struct(">QQIIB")


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int


@dataclass
class OutageStats:
    """For tests and `cusetpm status`."""

    outages: int = 0  # times the backend went down
    reconnects: int = 0  # times it was reached again after being down
    attempts: int = 0  # reconnect attempts, failed ones included
    restarts: int = 0  # TPM restarts or resets found on reconnecting


class BackendState:
    """Owns "the backend is down" for one ResourceManager."""

    def __init__(self, rm: ResourceManager, submit: Callable[[Callable[[], Any]], Future[Any]]):
        self.rm = rm
        self.backend = rm.backend
        self.link = rm.link
        self._submit = submit  # runs a function as RM work (holding `_current`)
        self.first_delay = rm.config.reopen_first_delay
        self.max_delay = rm.config.reopen_max_delay
        self.stats = OutageStats()
        self.clock: ClockInfo | None = None
        self._down_since: float | None = None
        self._last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    # -- called by the manager ------------------------------------------------------------

    def start(self) -> None:
        """After the RM started the TPM: from now on reconnecting is ours to do."""
        self.backend.auto_reconnect = False
        self.link.started = True
        self.clock = self._read_clock()

    def stop(self) -> None:
        self._stop.set()

    def check_open(self) -> None:
        """A new space while the backend is down: ENODEV, naming it."""
        since = self._down_since
        if since is not None:
            raise RMError(errno.ENODEV, f"the TPM backend {self.backend.name} is unreachable "
                          f"for {time.monotonic() - since:.1f} s ({self._last_error}); "
                          "reconnecting")

    def before_command(self) -> None:
        """While down, a command gets one quick attempt to reconnect, else EIO."""
        if self.down and not self._recover():
            raise RMError(errno.EIO, f"the TPM backend {self.backend.name} is unreachable "
                          f"({self._last_error}); reconnecting")

    def after_error(self, exc: BaseException) -> None:
        """A command failed; if the transport did, find out at once whether it is back."""
        cause = exc if isinstance(exc, BackendError) else exc.__cause__
        if isinstance(cause, BackendError) and not self.down:
            log.warning("TPM backend failed: %s", cause)
            self._recover()

    def close_offline(self, space: Space) -> None:
        """Close a space without the TPM (down, or failing at close): only the RM's tables.

        Its objects are forgotten; resident ones are flushed at the next reconcile. Its
        sessions may still be in the TPM if it comes back without a restart: they become
        orphans, flushed at the next reconcile (or forgotten at a restart).
        """
        executor = self.rm._executor
        assert executor is not None
        for entry in executor.sessions.owned_by(space):
            executor.orphans.add(entry.handle)
            executor.sessions.forget(entry.handle)
        for handle in sorted(space.client_saved):
            saved = executor.sessions.get(handle)
            if saved is not None:
                executor.sessions.abandon(saved)
        executor.residency.forget_space(space)  # resident ones: reconcile flushes them
        space.revoked.clear()
        executor.reconcile_needed = True
        log.info("space %d closed while the TPM backend is unreachable", space.id)

    # -- reaching the TPM again -----------------------------------------------------------

    def _recover(self) -> bool:
        """One attempt: reconnect, ask the TPM whether it restarted. True if it answers."""
        self.stats.attempts += 1
        try:
            self.backend.reopen()
            restarted, reset = self._probe()
            if restarted:
                self._after_restart(reset)
        except BackendError as exc:
            self._went_down(exc)
            return False
        if self._down_since is not None:
            self.stats.reconnects += 1
            log.warning("TPM backend %s is back after %.1f s", self.backend.name,
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _probe(self) -> tuple[bool, bool]:
        """(the TPM restarted, with a TPM Reset) since the RM last read its clock."""
        started = False
        try:
            now = self._read_clock()
        except TpmNotStarted:
            rc = int.from_bytes(self.link.transmit(build.startup(TPM_SU.CLEAR))[6:10], "big")
            if rc not in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
                raise BackendError(f"TPM2_Startup(SU_CLEAR) answered {rc_name(rc)}") from None
            log.warning("TPM behind %s was not started: sent TPM2_Startup(SU_CLEAR)",
                        self.backend.name)
            started = True
            now = self._read_clock()
        before, self.clock = self.clock, now
        if before is None:
            return started, started
        reset = now.reset_count != before.reset_count
        restarted = (started or reset or now.restart_count != before.restart_count
                     or now.clock < before.clock)
        if restarted:
            log.warning(
                "the TPM behind %s restarted: resetCount %d -> %d, restartCount %d -> %d, "
                "clock %d -> %d ms", self.backend.name, before.reset_count, now.reset_count,
                before.restart_count, now.restart_count, before.clock, now.clock,
            )
        return restarted, reset or started

    def _read_clock(self) -> ClockInfo:
        response = self.link.transmit(_READ_CLOCK)
        rc = int.from_bytes(response[6:10], "big")
        if rc != TPM_RC.SUCCESS or len(response) < 10 + _TIME_INFO.size:
            raise BackendError(f"TPM2_ReadClock answered {rc_name(rc)}")
        _, clock, resets, restarts, _ = _TIME_INFO.unpack_from(response, 10)
        return ClockInfo(clock, resets, restarts)

    def _after_restart(self, reset: bool) -> None:
        executor = self.rm._executor
        assert executor is not None
        with self.rm._cv:
            spaces = list(self.rm._spaces)
        objects = sum(len(s.objects) for s in spaces)
        sessions = len(executor.sessions)
        executor.after_tpm_restart(spaces, flush=not reset)
        executor.baseline = {
            handle
            for kind in (TPM_HT.TRANSIENT, TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION)
            for handle in executor.tpm_handles(kind)
        }
        self.stats.restarts += 1
        log.warning("TPM restart: %d objects and %d sessions of %d open spaces are lost; "
                    "their next use is refused", objects, sessions, len(spaces))

    def _went_down(self, exc: BackendError) -> None:
        self._last_error = str(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats.outages += 1
            log.error("TPM backend unreachable (%s): commands get EIO, opens ENODEV; "
                      "reconnecting", exc)
        else:
            log.debug("TPM backend still unreachable: %s", exc)
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._reopen_loop,
                                                name="cusetpm-reopen", daemon=True)
                self._thread.start()

    def _reopen_loop(self) -> None:
        delay = self.first_delay
        while self.down and not self._stop.wait(delay):
            if not self.down:
                break
            future = self._submit(self._attempt)
            while not self._stop.is_set():
                try:
                    future.result(timeout=0.5)
                    break
                except FutureTimeout:
                    continue
                except Exception:
                    log.exception("reconnect attempt failed")
                    break
            delay = min(delay * 2, self.max_delay)

    def _attempt(self) -> None:
        if self.down:  # a command may have reconnected meanwhile
            self._recover()
