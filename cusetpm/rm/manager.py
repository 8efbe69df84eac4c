"""The resource manager: spaces in, one TPM worker, commands in the scheduler's order.

Frontends call open_space/submit/cancel/close_space from any thread; everything that
touches the TPM or the RM's tables runs one job at a time: whoever holds `_current` (the
worker thread, or a submitter running its command inline on an idle TPM). Which queued job
runs next is scheduler.py's choice: quick commands before slow ones, with aging and a fair
share per uid (`schedule="fair"`), or arrival order (`schedule="fifo"`).

A command that needs a new session while the TPM has none free does not block the others:
it waits in a FIFO of its own (`_waiters`). A session freed by anyone goes to the first
waiter; after `session_evict_after` the RM evicts the least recently used idle session for
it; after `session_wait_max` it gets an RM-layer TPM_RC_SESSION_HANDLES.
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
from cusetpm.policy import NodePolicy
from cusetpm.rm import refusals
from cusetpm.rm.backendstate import BackendState
from cusetpm.rm.commandtable import CommandTable
from cusetpm.rm.config import RMConfig
from cusetpm.rm.counters import Counters
from cusetpm.rm.errors import RMError
from cusetpm.rm.execute import Executor, SessionsExhausted
from cusetpm.rm.quotas import NodeLimits, Quotas
from cusetpm.rm.regap import Regapper
from cusetpm.rm.residency import Capacity, Residency
from cusetpm.rm.scheduler import Scheduler
from cusetpm.rm.sessions import SessionTable
from cusetpm.rm.space import Space
from cusetpm.rm.tpmlink import TpmLink
from cusetpm.tpm import commands as build
from cusetpm.tpm.commands import TPMError
from cusetpm.tpm.constants import TPM_CAP, TPM_HT, TPM_PT, TPM_SU, command_name
from cusetpm.tpm.rc import TPM_RC, rc_name, rm_rc
from cusetpm.tpm.response import error_response

log = logging.getLogger(__name__)

READ_PROPERTIES = (
    TPM_PT.HR_TRANSIENT_MIN,
    TPM_PT.HR_LOADED_MIN,
    TPM_PT.ACTIVE_SESSIONS_MAX,
    TPM_PT.CONTEXT_GAP_MAX,
    TPM_PT.MAX_CAP_BUFFER,
    TPM_PT.HR_TRANSIENT_AVAIL,
    TPM_PT.HR_LOADED_AVAIL,
)


# A StartAuthSession that found the TPM full and was handed a freed session, but found it
# full again (someone outside the RM holds sessions): look again this much later.
TPM_FULL_RECHECK = 0.05


@dataclass(eq=False)
class Job:
    """Work for the TPM: a client command (`command`), or RM work (`run`)."""

    space: Space
    run: Callable[[], Any] | None
    future: Future[Any] = field(default_factory=Future)
    is_command: bool = False
    command: bytes = b""  # for command jobs: what the client sent
    waiting_since: float | None = None  # set while it waits for a TPM session
    handed_off: bool = False  # a freed session was handed to it: it may not be overtaken
    queued_at: float = 0.0  # set by the scheduler when it joins the queue
    deadline: float = float("inf")  # the scheduler's aging bound for it

    @property
    def space_key(self) -> int:
        return self.space.id

    @property
    def uid(self) -> int:
        return self.space.uid


@dataclass
class WaitStats:
    """Session exhaustion figures, for tests and benchmarks."""

    waited: int = 0  # commands that had to wait for a session
    max_wait: float = 0.0
    evictions: int = 0
    refused: int = 0  # waited past session_wait_max


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
        self._waiters: deque[Job] = deque()  # commands waiting for a TPM session, FIFO
        self._handed: deque[Job] = deque()  # waiters given a freed session: they run first
        self._freed_seen = 0  # sessions.freed when the waiters were last served
        self._next_service = float("inf")  # when the waiters need looking at again
        self.wait_stats = WaitStats()
        self.counters = Counters()  # for `cusetpm status` (rm/status.py)
        self.regapper: Regapper | None = None
        self.residency: Residency | None = None
        self.scheduler = Scheduler(self.config.schedule == "fair", self.config.aging)
        self.quotas = Quotas(self.config)  # per uid and per node (rm/quotas.py)
        self.backend_state = BackendState(self, self._rm_work)  # backend lost and back

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Learn the TPM (command list, limits) and start the worker."""
        table = CommandTable.read(self._startup_transmit)
        self.properties = self._read_properties()
        window = self.config.context_gap_window or self.properties.get(
            TPM_PT.CONTEXT_GAP_MAX, 0xFFFF
        )
        self.regapper = Regapper(self.link, self.sessions, window)
        self.residency = Residency(
            self.link, self.sessions, self.regapper, self._capacity(),
            eager=self.config.residency == "eager",
        )
        self._executor = Executor(
            self.link,
            table,
            self.sessions,
            self.config,
            self.regapper,
            self.residency,
            active_sessions_max=self.properties.get(TPM_PT.ACTIVE_SESSIONS_MAX, 64),
        )
        self._executor.quotas = self.quotas
        self.scheduler.known = table.__contains__  # durations only for the TPM's codes
        self._executor.baseline = {
            handle
            for kind in (TPM_HT.TRANSIENT, TPM_HT.HMAC_SESSION, TPM_HT.POLICY_SESSION)
            for handle in self._executor.tpm_handles(kind)
        }
        if self._executor.baseline:
            log.info(
                "the TPM already holds %s: the RM leaves them alone",
                ", ".join(f"0x{h:08x}" for h in sorted(self._executor.baseline)),
            )
        log.info(
            "TPM has %d commands; %s",
            len(table),
            ", ".join(f"{TPM_PT(p).name}={self.properties.get(p)}" for p in READ_PROPERTIES),
        )
        self.backend_state.start()
        self._thread = threading.Thread(target=self._work, name="cusetpm-tpm", daemon=True)
        self._thread.start()

    def _capacity(self) -> Capacity:
        """The TPM's free slots now (nothing of ours is loaded), less the headroom: on a TPM
        the kernel uses too, one object and one session slot are left for it by default."""
        shared = getattr(self.backend, "shared", False)
        default_free = 1 if shared else 0
        config = self.config
        return Capacity(
            objects=self.properties.get(TPM_PT.HR_TRANSIENT_AVAIL, 3),
            sessions=self.properties.get(TPM_PT.HR_LOADED_AVAIL, 3),
            keep_free_objects=(
                default_free if config.keep_free_objects is None else config.keep_free_objects
            ),
            keep_free_sessions=(
                default_free if config.keep_free_sessions is None else config.keep_free_sessions
            ),
        )

    def stop(self) -> None:
        """Finish what is queued, close every space (flushing it), stop the worker."""
        self.backend_state.stop()
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

    def open_space(
        self, uid: int = 0, pid: int = 0, node: str = "", policy: NodePolicy | None = None
    ) -> Space:
        with self._cv:
            if self._stopping:
                raise RMError(errno.ESHUTDOWN, "the resource manager is stopping")
            self.backend_state.check_open()
            if len(self._spaces) >= self.config.max_spaces:
                raise RMError(errno.ENFILE, f"{self.config.max_spaces} open spaces is the limit")
            self.quotas.check_open(uid, node)  # per uid, per node (rm/quotas.py)
            space = Space(uid=uid, pid=pid, node=node, policy=policy)
            self._spaces.add(space)
            self.quotas.opened(space)
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
            dropped = self._drop_waiters(space)
            job = Job(space, lambda: self._close(space))
            self._enqueue(job)
        _fail(dropped, RMError(errno.EBADF, f"space {space.id} closed"))
        if wait:
            job.future.result()
        return job.future

    # -- commands -------------------------------------------------------------------------

    def submit(self, space: Space, command: bytes, inline_if_idle: bool = False) -> Future[bytes]:
        """Queue one command; the future gives the response, or raises RMError.

        inline_if_idle: when nothing is queued or running, the caller's thread runs the
        command itself and gets a completed future. FIFO order holds (nobody is ahead of it)
        and the hand-off to the worker, which costs more than the RM's own work, is saved.
        """
        with self._cv:
            job = self._command_job(space, command)
            inline = inline_if_idle and not (
                self._queue or self._handed or self._waiters or self._current
            )
            if inline:
                self._current = job
                self.scheduler.started(job)  # under the lock already taken: no extra hop
            else:
                self._enqueue(job)
        if inline:
            self._run_job(job)
        return job.future

    def transmit(self, space: Space, command: bytes) -> bytes:
        """Blocking submit: the response, or RMError."""
        result: bytes = self.submit(space, command, inline_if_idle=True).result()
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
        return Job(space, None, is_command=True, command=command)

    def cancel(self, space: Space) -> None:
        """Drop the space's queued command, or ask the TPM to cancel the running one.

        The backend's cancel is asked with the lock held, while this space's command holds
        the TPM: no other command can start in between (starting one takes the lock), so the
        cancel can only hit this command or RM work of it (libtpms drops a cancel that lands
        between commands). Every backend's cancel returns at once. The future is completed
        after the lock is released, as every completion is.
        """
        with self._cv:
            dropped = [
                j for j in (*self._handed, *self._queue) if j.space is space and j.is_command
            ]
            for job in dropped:
                if job in self._handed:
                    self._handed.remove(job)
                    # The session it was handed is free again: the next waiter's, now (not
                    # at the next eviction or refusal time).
                    self._next_service = 0.0
                    self._cv.notify_all()
                else:
                    self._queue.remove(job)
                    self.scheduler.removed(job)
                self._busy.discard(space)
            dropped += self._drop_waiters(space)
            current = self._current
            running = current is not None and current.space is space and current.is_command
            if running and not dropped:
                log.info("space %d: cancelling the running command", space.id)
                self.backend.cancel()
        _fail(dropped, RMError(errno.EINTR, "command cancelled"))

    def tpm_census(self) -> dict[str, list[int]]:
        """What the TPM itself holds (not a space's view): for tests and diagnostics."""

        def census() -> dict[str, list[int]]:
            assert self._executor is not None
            return {
                name: self._executor.tpm_handles(kind)
                for name, kind in (
                    ("transient", TPM_HT.TRANSIENT),
                    ("loaded_sessions", TPM_HT.HMAC_SESSION),
                    ("saved_sessions", TPM_HT.POLICY_SESSION),
                )
            }

        result: dict[str, list[int]] = self._rm_work(census).result()
        return result

    def _rm_work(self, run: Callable[[], Any]) -> Future[Any]:
        """Queue RM work that needs the TPM (no space's command): its future."""
        job = Job(Space(uid=-1), run)
        with self._cv:
            self._enqueue(job)
        return job.future

    @property
    def round_trips(self) -> int:
        return self.link.stats.round_trips

    def set_node_policy(self, node: str, policy: NodePolicy | None) -> int:
        """SIGHUP: the open spaces of `node` follow its new policy; returns how many."""
        with self._cv:
            spaces = [s for s in self._spaces if s.node == node]
            for space in spaces:
                space.policy = policy
                space.policy_logged.clear()
        return len(spaces)

    def set_node_limits(self, node: str, limits: NodeLimits | None) -> None:
        """A node's quotas (config [node.limits]; SIGHUP replaces them). Checked at the next
        open or command: what is already held is never taken away."""
        with self._cv:
            self.quotas.set_node_limits(node, limits)

    @property
    def open_spaces(self) -> int:
        with self._cv:
            return len(self._spaces)

    # -- worker ---------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job)
        self.scheduler.enqueued(job, self._queue)
        self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                job = self._next_job()
                while job is None:
                    if self._stopping and not (self._current or self._queue or self._handed):
                        dropped = self._drop_waiters(None)
                        break
                    timeout = self._next_service - time.monotonic() if self._waiters else None
                    self._cv.wait(None if timeout is None else max(timeout, 0.0))
                    job = self._next_job()
                else:
                    self._current = job
                    if job.is_command:
                        self.scheduler.started(job)
            if job is None:
                _fail(dropped, RMError(errno.ESHUTDOWN, "RM stopping"))
                return
            self._run_job(job)

    def _next_job(self) -> Job | None:
        """What the worker runs next (lock held): serving the waiters first when it is due."""
        if self._current is not None:
            return None  # a job run inline by transmit() holds the TPM
        if self._handed:
            return self._handed.popleft()  # before serving again: hand-offs keep their order
        if self._waiters and (
            self.sessions.freed != self._freed_seen or time.monotonic() >= self._next_service
        ):
            return Job(Space(uid=-1), self._serve_waiters)
        return self.scheduler.pick(self._queue) if self._queue else None

    def _run_job(self, job: Job) -> None:
        """Runs a job that holds _current, on whichever thread it was given to.

        The space is free again before its future completes: a client answered can write its
        next command at once.
        """
        result: Any = None
        error: BaseException | None = None
        parked = False
        started = time.perf_counter()
        try:
            result = self._command(job) if job.run is None else job.run()
        except SessionsExhausted:
            parked = True
        except RMError as exc:
            error = exc
        except Exception as exc:
            log.exception("space %d: internal error", job.space.id)
            error = RMError(errno.EIO, f"internal error: {exc!r}")
        with self._cv:
            if job.is_command:
                self.scheduler.finished(job, time.perf_counter() - started)
            self._current = None
            if parked:
                self._park(job)
            elif job.is_command:
                self._busy.discard(job.space)
            # waking an idle worker costs GIL hand-offs: only when it has work
            if self._queue or self._handed or self._stopping or self._waiters:
                self._cv.notify_all()
        if parked:
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    # -- waiting for a TPM session --------------------------------------------------------

    def _park(self, job: Job) -> None:
        """The command needs a session the TPM cannot give now: it waits (lock held)."""
        now = time.monotonic()
        if job.waiting_since is None:
            job.waiting_since = now
            self.wait_stats.waited += 1
        if job.handed_off:
            # It was given a freed session and still found the TPM full: someone outside the
            # RM holds sessions. It keeps its place (ahead of those who came later); look
            # again a little later.
            place = 0
            while place < len(self._waiters) and self._waiters[place].handed_off:
                place += 1
            self._waiters.insert(place, job)
            self._next_service = min(self._next_service, now + TPM_FULL_RECHECK)
        else:
            self._waiters.append(job)
            first_look = min(self.config.session_evict_after, self.config.session_wait_max)
            self._next_service = min(self._next_service, job.waiting_since + first_look)
        log.debug(
            "space %d: waiting for a TPM session (%d waiting)", job.space.id, len(self._waiters)
        )

    def _serve_waiters(self) -> None:
        """Worker: hand freed sessions to the first waiters, evict for them, refuse the late."""
        assert self._executor is not None
        config = self.config
        now = time.monotonic()
        with self._cv:
            late = self._late_waiters(now)
            self._freed_seen = self.sessions.freed
            room = self._executor.active_sessions_max - len(self.sessions)
            self._hand_off(room)
        while True:
            with self._cv:
                head = self._waiters[0] if self._waiters else None
            if head is None or head.waiting_since is None:
                break
            if now < head.waiting_since + config.session_evict_after:
                break
            with self._cv:
                pending = [j.command for j in (*self._handed, *self._queue, *self._waiters)]
            in_flight = self._executor.sessions_named(pending)
            if self._executor.evict_idle_session(config.session_timeout, in_flight) is None:
                break
            self.wait_stats.evictions += 1
            with self._cv:
                self._freed_seen = self.sessions.freed
                self._hand_off(1)
        with self._cv:
            self._next_service = self._next_service_time(now)
        refusal = error_response(rm_rc(TPM_RC.SESSION_HANDLES))
        for job in late:
            job.future.set_result(refusal)

    def _hand_off(self, count: int) -> None:
        """The first `count` waiters run next, in their order, before anything else (lock held)."""
        chosen = [self._waiters.popleft() for _ in range(min(count, len(self._waiters)))]
        for job in chosen:
            job.handed_off = True
            self._handed.append(job)
            if job.waiting_since is not None:
                waited = time.monotonic() - job.waiting_since
                self.wait_stats.max_wait = max(self.wait_stats.max_wait, waited)

    def _late_waiters(self, now: float) -> list[Job]:
        """Take out the waiters past session_wait_max (lock held); the caller answers them."""
        late = []
        for job in list(self._waiters):
            assert job.waiting_since is not None
            if now - job.waiting_since >= self.config.session_wait_max:
                self._waiters.remove(job)
                self._busy.discard(job.space)
                self.wait_stats.refused += 1
                log.warning(
                    "space %d: no TPM session became free in %.1f s; refused",
                    job.space.id,
                    now - job.waiting_since,
                )
                late.append(job)
        return late

    def _next_service_time(self, now: float) -> float:
        """When the waiters need the worker again, if no session is freed before (lock held)."""
        if not self._waiters:
            return float("inf")
        assert self._executor is not None
        times = [
            j.waiting_since + self.config.session_wait_max for j in self._waiters if j.waiting_since
        ]
        head = self._waiters[0]
        if head.waiting_since is not None:
            evict_at = head.waiting_since + self.config.session_evict_after
            if evict_at <= now:
                evict_at = self._executor.next_evictable_at(self.config.session_timeout) or now + 1
            times.append(max(evict_at, now + 0.001))
        return min(times)

    def _drop_waiters(self, space: Space | None) -> list[Job]:
        """Take out the waiting commands of one space (or all); lock held. The caller fails
        them once the lock is released (_fail)."""
        dropped = [j for j in self._waiters if space is None or j.space is space]
        for job in dropped:
            self._waiters.remove(job)
            self._busy.discard(job.space)
        return dropped

    # -- commands on the TPM --------------------------------------------------------------

    def _command(self, job: Job) -> bytes:
        assert self._executor is not None, "start() was not called"
        space, command = job.space, job.command
        # Others wait for a session already: a newcomer needing one queues behind them.
        behind = not job.handed_off and job.waiting_since is None and bool(self._waiters)
        started = time.perf_counter()
        trips = self.link.stats.round_trips
        try:
            self.backend_state.before_command()
            response = self._executor.execute(space, command, queue_behind=behind)
        except RMError as exc:
            self.backend_state.after_error(exc)
            refusals.warn(space, "%s refused: %s", command_name(command), exc)
            raise
        code = int.from_bytes(command[6:10], "big") if len(command) >= 10 else -1
        if code not in self._executor.table:
            code = -1  # codes the TPM does not know share one entry: no state per hostile code
        self.counters.command(code, time.perf_counter() - started)
        space.commands += 1
        space.last_command, space.last_rc = code, int.from_bytes(response[6:10], "big")
        if log.isEnabledFor(logging.DEBUG):
            rc = int.from_bytes(response[6:10], "big")
            log.debug(
                "space %d: %s -> %s in %.0f us, %d round trips",
                space.id,
                command_name(command),
                rc_name(rc),
                (time.perf_counter() - started) * 1e6,
                self.link.stats.round_trips - trips,
            )
        return response

    def _close(self, space: Space) -> None:
        assert self._executor is not None
        try:
            if self.backend_state.down:
                self.backend_state.close_offline(space)
            else:
                self._executor.close(space)
        except BackendError as exc:
            self.backend_state.after_error(exc)
            self.backend_state.close_offline(space)
        refusals.report_at_close(space)
        with self._cv:
            self._spaces.discard(space)
            self.quotas.closed(space)
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


def _fail(jobs: list[Job], error: RMError) -> None:
    """Complete jobs taken out of the queues with an error; never with the lock held (a
    completion callback replies to the kernel and may call back into the RM)."""
    for job in jobs:
        job.future.set_exception(error)


