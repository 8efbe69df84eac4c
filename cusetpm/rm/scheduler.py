"""Which queued job the TPM runs next.

A TPM runs one command at a time and some run long (RSA key generation: 0.2-0.6 s on
libtpms, seconds on a discrete TPM). In arrival order a GetRandom behind three queued RSA
CreatePrimary calls waits for all three; tpm2-tss's device TCTI gives its first command one
second. So in `fair` mode the next job is, in order:

1. an overdue job (the earliest deadline first), so nothing starves however many quick
   commands keep arriving. A job's deadline is set when it is queued: `aging` times the wait
   it would have had in arrival order (the expected durations of the command running and of
   every job ahead of it), at least AGING_FLOOR. With the default aging of 2, no command
   waits more than twice its FIFO wait (give or take the misestimate, and the one command
   running when its deadline passes);
2. else the job with the least `expected duration + its user's lead`, ties in arrival order.
   The expected duration is learned per command code (and per key type where key
   generation makes it matter) as a moving average of measured durations, seeded with
   conservative defaults that mark RSA key generation slow. A user's lead is how much more
   TPM time its commands have had than the least-served user waiting: a uid with 50
   descriptors cannot take 50 shares while another uid waits (start-time fair queueing).

A job is never picked before an earlier job of the same space (a close stays after the
space's command). `fifo` mode picks the head, as before. Session waiters handed a freed
session are not in this queue: the manager runs them first.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from cusetpm.tpm.constants import TPM_CC, TPM_HEADER_SIZE, TPM_ST, command_name

log = logging.getLogger(__name__)

TPM_ALG_RSA = 0x0001

# Commands that generate a key: their duration depends on the key type in inPublic.
KEY_GENERATING = frozenset({TPM_CC.CreatePrimary, TPM_CC.Create, TPM_CC.CreateLoaded})

# Seeds, in seconds, until the TPM's own durations are learned: conservative where a discrete
# TPM is slow (RSA key generation takes seconds there), a millisecond for everything else.
SEED_RSA_KEYGEN = 1.0
SEED_OTHER_KEYGEN = 0.05
SEED_DEFAULT = 0.001
# Weight of the newest measurement in the moving average.
EWMA_WEIGHT = 0.25
# The shortest deadline a queued job gets, in seconds: below this, reordering is noise.
AGING_FLOOR = 0.05


class Schedulable(Protocol):
    """What the scheduler reads of a manager's job."""

    @property
    def space_key(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def command(self) -> bytes: ...
    queued_at: float
    deadline: float


J = TypeVar("J", bound=Schedulable)


def duration_key(command: bytes) -> tuple[int, int]:
    """(command code, RSA or not) for key generation; (command code, 0) otherwise."""
    if len(command) < TPM_HEADER_SIZE:
        return (-1, 0)
    code = int.from_bytes(command[6:10], "big")
    if code not in KEY_GENERATING:
        return (code, 0)
    return (code, 1 if key_type(command) == TPM_ALG_RSA else 2)


def key_type(command: bytes) -> int | None:
    """inPublic.type of CreatePrimary / Create / CreateLoaded (one handle each), if it parses:
    header, handle, [authorizationSize + area], inSensitive (TPM2B), inPublic (size, type)."""
    offset = TPM_HEADER_SIZE + 4
    if int.from_bytes(command[0:2], "big") == TPM_ST.SESSIONS:
        if len(command) < offset + 4:
            return None
        offset += 4 + int.from_bytes(command[offset : offset + 4], "big")
    if len(command) < offset + 2:
        return None
    offset += 2 + int.from_bytes(command[offset : offset + 2], "big")
    if len(command) < offset + 4:
        return None
    return int.from_bytes(command[offset + 2 : offset + 4], "big")


@dataclass
class Durations:
    """Expected duration per duration_key, learned from this TPM."""

    averages: dict[tuple[int, int], float] = field(default_factory=dict)

    def expected(self, key: tuple[int, int]) -> float:
        known = self.averages.get(key)
        if known is not None:
            return known
        code, kind = key
        if code in KEY_GENERATING:
            return SEED_RSA_KEYGEN if kind == 1 else SEED_OTHER_KEYGEN
        return SEED_DEFAULT

    def measured(self, key: tuple[int, int], seconds: float) -> None:
        known = self.averages.get(key)
        self.averages[key] = seconds if known is None else known + EWMA_WEIGHT * (seconds - known)


@dataclass
class SchedulerStats:
    reordered: int = 0  # picks that were not the head of the queue
    overdue: int = 0  # picks made because a job reached the aging bound
    max_wait: float = 0.0  # longest queue wait of a picked job


class Scheduler:
    """Picks the next job of the manager's queue. Every method is called with the manager's
    lock held."""

    def __init__(self, fair: bool, aging: float):
        self.fair = fair
        self.aging = aging
        # Command codes the TPM knows (the RM sets it at start): durations are learned for
        # those only, so hostile codes cannot grow the table.
        self.known: Callable[[int], bool] = lambda code: True
        self.durations = Durations()
        self.service: dict[int, float] = {}  # uid -> TPM seconds its commands have had
        self.stats = SchedulerStats()
        self._queued_work = 0.0  # expected seconds of the jobs in the queue
        self._running_work = 0.0  # expected seconds of the job holding the TPM
        self._running_key: tuple[int, int] | None = None  # its duration_key

    # -- the queue changes ----------------------------------------------------------------

    def enqueued(self, job: Schedulable, queue: Iterable[Schedulable]) -> None:
        """`job` was just appended to `queue`."""
        now = time.monotonic()
        job.queued_at = now
        if not self.fair:
            return
        expected = self.expected(job)
        ahead = self._running_work + self._queued_work
        job.deadline = now + max(AGING_FLOOR, self.aging * (ahead + expected))
        self._queued_work += expected
        self._level_service(job, queue)

    def removed(self, job: Schedulable) -> None:
        """`job` left the queue without running (cancelled, or its space closed)."""
        if self.fair:
            self._queued_work = max(0.0, self._queued_work - self.expected(job))

    def pick(self, queue: deque[J]) -> J:
        """Remove and return the job to run next; the queue is not empty."""
        now = time.monotonic()
        if not self.fair:
            job = queue.popleft()
        else:
            index, reason = (0, "") if len(queue) == 1 else self._choose(queue, now)
            job = queue[index]
            del queue[index]
            self._queued_work = max(0.0, self._queued_work - self.expected(job))
            if index:
                self.stats.reordered += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "space %d: %s runs before %d earlier job(s) (%s; waited %.0f ms)",
                        job.space_key,
                        command_name(job.command) if job.command else "RM work",
                        index,
                        reason,
                        (now - job.queued_at) * 1e3,
                    )
        self.stats.max_wait = max(self.stats.max_wait, now - job.queued_at)
        return job

    def started(self, job: Schedulable) -> None:
        """`job` holds the TPM now (from the queue, or inline on an idle TPM). On the hot path
        of a single client: the command is parsed here once, and fifo does nothing."""
        if not self.fair:
            return
        key = duration_key(job.command) if job.command else None
        if key is not None and not self.known(key[0]):
            key = (-1, 0)  # every code the TPM does not know: one entry
        self._running_key = key
        self._running_work = 0.0 if key is None else self.durations.expected(key)

    def finished(self, job: Schedulable, seconds: float) -> None:
        """A command ran for `seconds` (fifo learns nothing: it never looks)."""
        if not self.fair:
            return
        self._running_work = 0.0
        key, self._running_key = self._running_key, None
        if key is None:
            return
        self.durations.measured(key, seconds)
        self.service[job.uid] = self.service.get(job.uid, 0.0) + seconds

    # -- the choice -------------------------------------------------------------------------

    def _choose(self, queue: Iterable[J], now: float) -> tuple[int, str]:
        seen_spaces: set[int] = set()
        eligible: list[tuple[int, J]] = []
        overdue: tuple[int, J] | None = None
        for index, job in enumerate(queue):
            if job.space_key in seen_spaces:
                continue  # an earlier job of this space goes first
            seen_spaces.add(job.space_key)
            if now >= job.deadline and (overdue is None or job.deadline < overdue[1].deadline):
                overdue = (index, job)
            eligible.append((index, job))
        if overdue is not None:
            self.stats.overdue += 1
            return overdue[0], "overdue"
        least = min(self._service_of(job.uid) for _, job in eligible)
        best = min(
            eligible,
            key=lambda item: (
                self.expected(item[1]) + self._service_of(item[1].uid) - least,
                item[0],
            ),
        )
        return best[0], "quicker, or its user less served"

    def expected(self, job: Schedulable) -> float:
        """Expected seconds at the TPM; RM work (no command) counts as none."""
        return self.durations.expected(duration_key(job.command)) if job.command else 0.0

    def _service_of(self, uid: int) -> float:
        return self.service.get(uid, 0.0)

    def _level_service(self, job: Schedulable, queue: Iterable[Schedulable]) -> None:
        """A user that had nothing waiting starts level with the least-served user waiting:
        idle time earns no credit."""
        waiting = {other.uid for other in queue if other is not job}
        if job.uid in waiting:
            return
        floor = min((self._service_of(uid) for uid in waiting), default=None)
        if floor is None:
            self.service = {job.uid: 0.0}  # nobody else waits: history no longer matters
        else:
            self.service[job.uid] = max(self._service_of(job.uid), floor)


