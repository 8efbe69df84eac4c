"""The resource manager: spaces in, one TPM worker, commands in FIFO order.

Frontends call open_space/submit/cancel/close_space from any thread; everything that
touches the TPM or the RM's tables runs on the single worker thread, in arrival order,
so a long command (RSA key generation) never lets a later one overtake it.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cusetpm.backends.base import Backend, BackendError
from cusetpm.rm.commandtable import CommandTable
from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.rm.execute import Executor
from cusetpm.rm.sessions import SessionTable
from cusetpm.rm.space import Space
from cusetpm.rm.tpmlink import TpmLink
from cusetpm.tpm import commands as build
from cusetpm.tpm.commands import TPMError
from cusetpm.tpm.constants import TPM_CAP, TPM_HT, TPM_PT, TPM_SU, cc_name
from cusetpm.tpm.rc import TPM_RC, rc_name

log = logging.getLogger(__name__)

READ_PROPERTIES = (
    TPM_PT.HR_TRANSIENT_MIN,
    TPM_PT.HR_LOADED_MIN,
    TPM_PT.ACTIVE_SESSIONS_MAX,
    TPM_PT.CONTEXT_GAP_MAX,
    TPM_PT.MAX_CAP_BUFFER,
    TPM_PT.HR_TRANSIENT_AVAIL,
)


@dataclass(eq=False)
class Job:
    space: Space
    run: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    is_command: bool = False


class ResourceManager:
    """Any number of spaces over one TPM backend."""

    def __init__(self, backend: Backend, config: RMConfig | None = None):
        self.backend = backend
        self.config = config or RMConfig()
        self.link = TpmLink(backend, self.config.retry_first_delay, self.config.retry_max_delay)
        self.sessions = SessionTable()
        self.properties: dict[int, int] = {}
        self._executor: Executor | None = None
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._current: Job | None = None
        self._spaces: set[Space] = set()
        self._per_uid: Counter[int] = Counter()
        self._busy: set[Space] = set()  # spaces with a command queued or running
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Learn the TPM (command list, limits) and start the worker."""
        table = CommandTable.read(self._startup_transmit)
        self.properties = self._read_properties()
        self._executor = Executor(self.link, table, self.sessions, self.config)
        log.info(
            "TPM has %d commands; %s",
            len(table),
            ", ".join(f"{TPM_PT(p).name}={self.properties.get(p)}" for p in READ_PROPERTIES),
        )
        self._thread = threading.Thread(target=self._work, name="cusetpm-tpm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, close every space (flushing it), stop the worker."""
        with self._cv:
            spaces = list(self._spaces)
        for space in spaces:
            self.close_space(space, wait=False)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- spaces ---------------------------------------------------------------------------

    def open_space(self, uid: int = 0) -> Space:
        with self._cv:
            if self._stopping:
                raise RMError(errno.ESHUTDOWN, "the resource manager is stopping")
            if len(self._spaces) >= self.config.max_spaces:
                raise RMError(errno.ENFILE, f"{self.config.max_spaces} open spaces is the limit")
            per_uid = self.config.max_spaces_per_uid
            if per_uid is not None and self._per_uid[uid] >= per_uid:
                raise RMError(errno.EMFILE, f"uid {uid} has {per_uid} open spaces, the limit")
            space = Space(uid=uid)
            self._spaces.add(space)
            self._per_uid[uid] += 1
        log.debug("space %d opened (uid %d)", space.id, uid)
        return space

    def close_space(self, space: Space, wait: bool = True) -> Future[None]:
        """Flush everything the space owns, after its queued or running command."""
        with self._cv:
            if space.closed:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            space.closed = True
            job = Job(space, lambda: self._close(space))
            self._enqueue(job)
        if wait:
            job.future.result()
        return job.future

    # -- commands -------------------------------------------------------------------------

    def submit(self, space: Space, command: bytes) -> Future[bytes]:
        """Queue one command; the future gives the response, or raises RMError."""
        with self._cv:
            job = self._command_job(space, command)
            self._enqueue(job)
        return job.future

    def transmit(self, space: Space, command: bytes) -> bytes:
        """Blocking submit: the response, or RMError.

        When nothing is queued or running, the caller's thread runs the command itself: FIFO
        order holds (nobody is ahead of it) and the hand-off to the worker, which would cost
        more than the RM's own work, is saved.
        """
        with self._cv:
            job = self._command_job(space, command)
            inline = not self._queue and self._current is None
            if inline:
                self._current = job
            else:
                self._enqueue(job)
        if inline:
            self._run_job(job)
        result: bytes = job.future.result()
        return result

    def _command_job(self, space: Space, command: bytes) -> Job:
        """A job for one command, the space marked busy. Call with the lock held."""
        if space.closed:
            raise RMError(errno.EBADF, f"space {space.id} is closed")
        if space in self._busy:
            raise RMError(errno.EBUSY, f"space {space.id} already has a command in flight")
        if self._stopping:
            raise RMError(errno.ESHUTDOWN, "the resource manager is stopping")
        self._busy.add(space)
        return Job(space, lambda: self._command(space, command), is_command=True)

    def cancel(self, space: Space) -> None:
        """Drop the space's queued command, or ask the TPM to cancel the running one."""
        with self._cv:
            for job in self._queue:
                if job.space is space and job.is_command:
                    self._queue.remove(job)
                    self._busy.discard(space)
                    job.future.set_exception(RMError(errno.EINTR, "command cancelled"))
                    return
            running = self._current is not None and self._current.space is space
        if running and self._current is not None and self._current.is_command:
            log.info("space %d: cancelling the running command", space.id)
            self.backend.cancel()

    def tpm_census(self) -> dict[str, list[int]]:
        """What the TPM itself holds (not a space's view): for tests and diagnostics."""

        def census() -> dict[str, list[int]]:
            return {
                kind: self._tpm_handles(first)
                for kind, first in (
                    ("transient", TPM_HT.TRANSIENT << 24),
                    ("loaded_sessions", TPM_HT.HMAC_SESSION << 24),
                    ("saved_sessions", TPM_HT.POLICY_SESSION << 24),
                )
            }

        job = Job(Space(uid=-1), census)
        with self._cv:
            self._enqueue(job)
        result: dict[str, list[int]] = job.future.result()
        return result

    @property
    def round_trips(self) -> int:
        return self.link.stats.round_trips

    @property
    def open_spaces(self) -> int:
        with self._cv:
            return len(self._spaces)

    # -- worker ---------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job)
        self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                # A job run inline by transmit() also holds _current: wait for it.
                while (not self._queue or self._current is not None) and not (
                    self._stopping and self._current is None
                ):
                    self._cv.wait()
                if not self._queue:
                    return
                job = self._current = self._queue.popleft()
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        """Runs a job that holds _current, on whichever thread it was given to."""
        try:
            job.future.set_result(job.run())
        except RMError as exc:
            job.future.set_exception(exc)
        except Exception as exc:
            log.exception("space %d: internal error", job.space.id)
            job.future.set_exception(RMError(errno.EIO, f"internal error: {exc!r}"))
        finally:
            with self._cv:
                self._current = None
                if job.is_command:
                    self._busy.discard(job.space)
                if self._queue or self._stopping:  # waking an idle worker costs GIL hand-offs
                    self._cv.notify_all()

    def _command(self, space: Space, command: bytes) -> bytes:
        assert self._executor is not None, "start() was not called"
        started = time.perf_counter()
        trips = self.link.stats.round_trips
        name = cc_name(int.from_bytes(command[6:10], "big")) if len(command) >= 10 else "?"
        try:
            response = self._executor.execute(space, command)
        except RMError as exc:
            log.warning("space %d: %s refused: %s", space.id, name, exc)
            raise
        if log.isEnabledFor(logging.DEBUG):
            rc = int.from_bytes(response[6:10], "big")
            log.debug(
                "space %d: %s -> %s in %.0f us, %d round trips",
                space.id,
                name,
                rc_name(rc),
                (time.perf_counter() - started) * 1e6,
                self.link.stats.round_trips - trips,
            )
        return response

    def _close(self, space: Space) -> None:
        for entry in self.sessions.owned_by(space):
            self.link.flush_quietly(entry.handle)
            self.sessions.forget(entry.handle)
        for vhandle in list(space.objects):
            space.drop_object(vhandle)
        with self._cv:
            self._spaces.discard(space)
            self._per_uid[space.uid] -= 1
            if self._per_uid[space.uid] <= 0:
                del self._per_uid[space.uid]
        log.debug("space %d closed", space.id)

    # -- talking to the TPM at start ------------------------------------------------------

    def _startup_transmit(self, command: bytes) -> bytes:
        """transmit for start(): sends TPM2_Startup(CLEAR) once if the TPM was never started."""
        response = self.link.transmit(command)
        if int.from_bytes(response[6:10], "big") == TPM_RC.INITIALIZE:
            log.info("TPM was not started; sending TPM2_Startup(SU_CLEAR)")
            self.link.transmit(build.startup(TPM_SU.CLEAR))
            response = self.link.transmit(command)
        return response

    def _read_properties(self) -> dict[int, int]:
        properties: dict[int, int] = {}
        for first in (TPM_PT.FAMILY_INDICATOR, TPM_PT.PERMANENT):
            try:
                _, data = build.parse_get_capability(
                    self.link.transmit(build.get_capability(TPM_CAP.TPM_PROPERTIES, first, 64))
                )
            except (TPMError, BackendError) as exc:
                log.warning("reading TPM properties from 0x%x failed: %s", first, exc)
                continue
            properties.update((p.property, p.value) for p in data.properties)
        return properties

    def _tpm_handles(self, first: int) -> list[int]:
        handles: list[int] = []
        prop = first
        while True:
            more, data = build.parse_get_capability(
                self.link.transmit(build.get_capability(TPM_CAP.HANDLES, prop, 254))
            )
            handles.extend(data.handles)
            if not more or not data.handles:
                return handles
            prop = data.handles[-1] + 1
