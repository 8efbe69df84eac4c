"""Global session exhaustion: libtpms has 64 sessions for all spaces together
(TPM_PT_ACTIVE_SESSIONS_MAX).

Contract (issue "Global TPM resources"): a StartAuthSession that finds no free session waits
in a FIFO; a session freed by anyone goes to the first waiter; after `session_evict_after` the
RM evicts the least recently used session idle for longer than `session_timeout` (never one a
command in flight uses); the evicted owner's next use gets 0x000B0910+n (handle area position
n) or 0x000B0918+n (authorization area position n), never the session that reused the number;
past `session_wait_max` the answer is 0x000B0905; a client never sees the TPM's own 0x905.
Timeouts are small here (RMConfig) to keep every test fast.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from cusetpm.backends.base import Backend
from cusetpm.rm import ResourceManager, RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import AuthCommand, Command
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_SE, TPM_ST
from tests.rm.client import (
    RC_ATTRIBUTES_S1,
    RC_RM_EVICTED_H0,
    RC_RM_EVICTED_S0,
    RC_RM_SESSION_HANDLES,
    RC_RM_SESSION_MEMORY,
    RC_STALE_TOKEN,
    RawClient,
    get_random_with_session,
    handle_of,
    policy_restart_command,
    rc_of,
    space_sessions,
    start_session_command,
)
from tests.rm.conftest import RMFactory, assert_tpm_empty
from tests.rm.faults import FaultyBackend

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

TPM_SESSIONS = 64  # libtpms' TPM_PT_ACTIVE_SESSIONS_MAX
RC_SESSION_HANDLES = 0x905
INDEX = 0x00FFFFFF


def config(**overrides: float) -> RMConfig:
    """One space may hold all 64 sessions; waiting, eviction and refusal as the test says."""
    values: dict = {
        "max_sessions": TPM_SESSIONS,
        "session_timeout": 60.0,
        "session_evict_after": 60.0,
        "session_wait_max": 60.0,
    }
    values.update(overrides)
    return RMConfig(**values)


def new_client(rm: ResourceManager) -> RawClient:
    return RawClient(rm, rm.open_space())


def usable(client: RawClient, session: int) -> bool:
    return rc_of(client.send(policy_restart_command(session))) == 0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def park(rm: ResourceManager, client: RawClient) -> Future[bytes]:
    """Submit a StartAuthSession that must wait; returns once the RM has parked it."""
    waited = rm.wait_stats.waited
    future = rm.submit(client.space, start_session_command())
    wait_until(lambda: rm.wait_stats.waited == waited + 1)
    assert not future.done()
    return future


def fill(holder: RawClient, count: int) -> list[int]:
    return [holder.start_session(TPM_SE.POLICY) for _ in range(count)]


def assert_full(rm: ResourceManager) -> None:
    census = rm.tpm_census()
    assert len(census["saved_sessions"]) == TPM_SESSIONS, census


def never_tpm_905(response: bytes) -> bytes:
    assert rc_of(response) != RC_SESSION_HANDLES, "a client saw the TPM's own 0x905"
    return response


# -- many clients, few sessions ----------------------------------------------------------------


def test_100_spaces_from_100_threads_on_64_sessions(rm: ResourceManager) -> None:
    """Each thread: StartAuthSession, a few uses, flush, close. All of them complete."""
    threads = 100
    start = threading.Barrier(threads)
    results: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            client = new_client(rm)
            start.wait()
            response = never_tpm_905(client.send(start_session_command()))
            results[i].append(rc_of(response))
            session = handle_of(response)
            for _ in range(3):
                time.sleep(0.02)  # hold it a while: the others must wait
                results[i].append(
                    rc_of(never_tpm_905(client.send(policy_restart_command(session))))
                )
            results[i].append(rc_of(client.send(build.flush_context(session))))
            rm.close_space(client.space)
        except BaseException as exc:  # reported below, with the thread's number
            errors.append(exc)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    elapsed = time.perf_counter() - started
    stats = rm.wait_stats
    print(
        f"\n100 spaces on 64 sessions: {elapsed:.2f} s; waited {stats.waited}, "
        f"max wait {stats.max_wait * 1e3:.0f} ms, evictions {stats.evictions}, "
        f"refused {stats.refused}"
    )
    assert not errors, errors
    assert all(not t.is_alive() for t in pool)
    assert results == [[0, 0, 0, 0, 0]] * threads
    assert stats.waited >= threads - TPM_SESSIONS
    # Nobody was refused (so nobody waited past session_wait_max) and nobody was evicted:
    # each waiter got a session another thread flushed.
    assert stats.evictions == 0 and stats.refused == 0
    assert stats.max_wait > 0
    assert rm.open_spaces == 0
    assert_tpm_empty(rm)


# -- first come, first served ------------------------------------------------------------------


def test_waiters_get_freed_sessions_in_arrival_order(make_rm: RMFactory) -> None:
    rm = make_rm(config())
    holder = new_client(rm)
    held = fill(holder, TPM_SESSIONS)
    assert_full(rm)
    waiters = [new_client(rm) for _ in range(12)]
    futures = [park(rm, w) for w in waiters]  # arrival order known: each parked in turn
    assert rm.wait_stats.waited == len(waiters)
    got: list[int] = []  # waiter numbers, in the order they were served

    def served() -> list[int]:
        return [i for i, f in enumerate(futures) if f.done() and i not in got]

    # wave 1: one session at a time
    for freed in held[:4]:
        holder.flush(freed)
        wait_until(lambda: len(served()) == 1)
        (i,) = served()
        got.append(i)
        # the waiter got the freed slot: libtpms gives the lowest free one, the only one free
        assert handle_of(futures[i].result()) & INDEX == freed & INDEX
    assert got == [0, 1, 2, 3]

    # wave 2: three freed back to back; the first waiter runs first, so gets the lowest
    wave = sorted(held[4:7], key=lambda h: h & INDEX)
    for freed in wave:
        holder.flush(freed)
    wait_until(lambda: len(served()) == 3)
    order = served()
    assert order == [4, 5, 6]
    assert [handle_of(futures[i].result()) & INDEX for i in order] == [h & INDEX for h in wave]
    got += order

    # a newcomer arriving now queues behind the waiters, even as a session is freed
    newcomer = new_client(rm)
    holder.flush(held[7])
    late = rm.submit(newcomer.space, start_session_command())
    wait_until(lambda: len(served()) == 1)
    assert served() == [7]
    got += [7]
    time.sleep(0.05)
    assert not late.done()

    # a waiter that goes away leaves the queue; one cancelled likewise
    rm.close_space(waiters[8].space)
    with pytest.raises(RMError) as info:
        futures[8].result(1)
    assert info.value.errno == errno.EBADF
    rm.cancel(waiters[9].space)
    with pytest.raises(RMError) as info:
        futures[9].result(1)
    assert info.value.errno == errno.EINTR
    got += [8, 9]
    for freed in held[8:11]:
        holder.flush(freed)
    wait_until(lambda: len(served()) == 2 and late.done())
    assert served() == [10, 11]
    assert rc_of(late.result()) == 0
    assert rm.wait_stats.evictions == 0 and rm.wait_stats.refused == 0
    print(f"\nFIFO: max wait {rm.wait_stats.max_wait * 1e3:.0f} ms")
    for client in [*waiters, newcomer, holder]:
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_cancelled_waiter_handed_a_freed_session_passes_it_on(make_rm: RMFactory) -> None:
    """Two sessions freed at once go to the first two waiters; the second is cancelled
    after the hand-off, before it runs (the first holds the worker at the TPM). cancel()
    drops it, its space is free for its next command, and the session it would have had
    goes to the third waiter at once (no eviction, no refusal: both are an hour away)."""
    rm = make_rm(config(session_evict_after=3600.0, session_wait_max=3600.0),
                 wrap=FaultyBackend)
    faulty = rm.backend
    assert isinstance(faulty, FaultyBackend)
    holder, pair = new_client(rm), new_client(rm)
    held = fill(holder, TPM_SESSIONS - 2)
    fill(pair, 2)
    assert_full(rm)
    w1, w2, w3 = new_client(rm), new_client(rm), new_client(rm)
    f1, f2, f3 = park(rm, w1), park(rm, w2), park(rm, w3)
    gate = faulty.hold(TPM_CC.StartAuthSession)  # the first waiter's, once handed its session
    mark = faulty.mark()
    rm.close_space(pair.space)  # two sessions freed in one job: one service hands both
    try:
        assert faulty.wait_started(TPM_CC.StartAuthSession, mark)  # w1 holds the worker
        assert not f2.done() and not f3.done()
        rm.cancel(w2.space)  # w2 was handed a session and has not run
    finally:
        gate.set()
    with pytest.raises(RMError) as info:
        f2.result(10)
    assert info.value.errno == errno.EINTR
    s1 = handle_of(never_tpm_905(f1.result(10)))
    # 3600 s from any eviction or refusal: only the session w2 let go can serve w3 by then.
    s3 = handle_of(never_tpm_905(f3.result(10)))
    assert usable(w1, s1) and usable(w3, s3)
    assert rm.wait_stats.evictions == 0 and rm.wait_stats.refused == 0
    # w2's space is free again (not left busy): its next command runs, and finds the TPM
    # full again, so it waits like anyone (no session was lost to the cancel).
    assert len(w2.get_random(8)) == 8
    assert len(rm.sessions) == TPM_SESSIONS
    holder.flush(held[0])
    s2 = handle_of(never_tpm_905(rm.submit(w2.space, start_session_command()).result(10)))
    assert usable(w2, s2)
    for client in (holder, w1, w2, w3):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


# -- eviction ----------------------------------------------------------------------------------


EVICT_TIMEOUT = 0.5


def evict_for_two_waiters(
    rm: ResourceManager, faulty: FaultyBackend | None = None
) -> tuple[int, int, int, int, float]:
    """x (older) and y idle past the timeout, 62 sessions just used; two waiters arrive in
    turn. Returns (x, y, first waiter's session, second waiter's session, time waited);
    every space is closed again. With `faulty`, a slow command keeps the worker busy until
    both waiters are due for an eviction: one service evicts for both."""
    sx, sy, busy = new_client(rm), new_client(rm), new_client(rm)
    x = sx.start_session(TPM_SE.POLICY)
    time.sleep(0.05)
    y = sy.start_session(TPM_SE.POLICY)
    busy_sessions = fill(busy, TPM_SESSIONS - 2)
    time.sleep(EVICT_TIMEOUT + 0.05)  # all of them idle past the timeout now ...
    for session in busy_sessions:  # ... but these were just used
        assert usable(busy, session)
    w1, w2 = new_client(rm), new_client(rm)
    started = time.monotonic()
    f1 = park(rm, w1)
    f2 = park(rm, w2)
    if faulty is not None:
        faulty.slow(0.3, {TPM_CC.GetRandom})
        slow = new_client(rm)
        assert rc_of(slow.send(build.get_random(8))) == 0
        faulty.heal()
        rm.close_space(slow.space)
    s1 = handle_of(never_tpm_905(f1.result(5)))
    s2 = handle_of(never_tpm_905(f2.result(5)))
    waited = time.monotonic() - started
    for session in busy_sessions:
        assert usable(busy, session)
    assert usable(w1, s1) and usable(w2, s2)
    assert space_sessions(sx) == [] and space_sessions(sy) == []
    for client in (sx, sy, busy, w1, w2):
        rm.close_space(client.space)
    return x, y, s1, s2, waited


def test_only_idle_sessions_are_evicted(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_timeout=EVICT_TIMEOUT, session_evict_after=0.1))
    x, y, s1, s2, waited = evict_for_two_waiters(rm)
    print(f"\neviction: two waiters served in {waited * 1e3:.0f} ms")
    assert waited >= 0.1  # not before session_evict_after
    # Served by the two evictions (no session was flushed, nobody refused), not by a timeout.
    assert rm.wait_stats.evictions == 2 and rm.wait_stats.refused == 0
    # the two idle ones went (the waiters got their numbers); the 62 used ones stayed
    assert sorted([s1 & INDEX, s2 & INDEX]) == sorted([x & INDEX, y & INDEX])
    assert_tpm_empty(rm)


def test_evictions_for_several_waiters_keep_their_order(make_rm: RMFactory) -> None:
    """Two evictions in one service: the first waiter still runs first, so (libtpms giving
    the lowest free slot) it gets the first evicted session's number, x's."""
    rm = make_rm(config(session_timeout=EVICT_TIMEOUT, session_evict_after=0.1), wrap=FaultyBackend)
    assert isinstance(rm.backend, FaultyBackend)
    x, y, s1, s2, _ = evict_for_two_waiters(rm, rm.backend)
    assert rm.wait_stats.evictions == 2
    assert x & INDEX < y & INDEX
    assert (s1 & INDEX, s2 & INDEX) == (x & INDEX, y & INDEX), "the second waiter ran first"
    assert_tpm_empty(rm)


def policy_secret_command(auth_handle: int, session: int, auth: int) -> bytes:
    """PolicySecret(authHandle, policySession): a session at handle position 1, and `auth`
    in the authorization area."""
    params = b"\0\0" + b"\0\0" + b"\0\0" + struct.pack(">i", 0)  # nonceTPM, cpHash, ref, exp
    sessions = [AuthCommand(auth, b"", 0x01, b"")]
    return Command(
        TPM_ST.SESSIONS, TPM_CC.PolicySecret, [auth_handle, session], sessions, params
    ).to_bytes()


def two_session_get_random(first: int, second: int) -> bytes:
    sessions = [AuthCommand(h, b"\0" * 16, 0x01, b"") for h in (first, second)]
    return Command(TPM_ST.SESSIONS, TPM_CC.GetRandom, [], sessions, struct.pack(">H", 8)).to_bytes()


def test_evicted_owner_gets_the_rm_error_never_the_reused_session(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_timeout=0.2, session_evict_after=0.05))
    owner, holder = new_client(rm), new_client(rm)
    victim = owner.start_session(TPM_SE.POLICY)
    kept = owner.start_session(TPM_SE.HMAC)
    fill(holder, TPM_SESSIONS - 2)
    time.sleep(0.25)
    for session in space_sessions(holder):
        assert usable(holder, session)
    # kept reaches the TPM, which refuses a session without audit or encrypt on GetRandom with
    # its own TPM_RC_ATTRIBUTES for session 1 (0x982): not the RM's evicted code
    assert rc_of(owner.send(get_random_with_session(kept))) == RC_ATTRIBUTES_S1
    # victim is now the only session idle past the timeout
    thief = new_client(rm)
    taken = handle_of(rm.submit(thief.space, start_session_command()).result(5))
    assert rm.wait_stats.evictions == 1
    assert taken == victim  # the TPM reused the number for the waiter's new session
    assert space_sessions(owner) == [kept]
    # every way the old owner names the number: the RM's error, by position
    cases = [
        (policy_restart_command(victim), RC_RM_EVICTED_H0),
        (build.flush_context(victim), RC_RM_EVICTED_H0),
        (build.context_save(victim), RC_RM_EVICTED_H0),
        (build.read_public(victim), RC_RM_EVICTED_H0),
        (policy_secret_command(TPM_RH.OWNER, victim, 0x40000009), RC_RM_EVICTED_H0 + 1),
        (get_random_with_session(victim), RC_RM_EVICTED_S0),
        (two_session_get_random(kept, victim), RC_RM_EVICTED_S0 + 1),
    ]
    for command, expected in cases:
        response = owner.send(command)
        assert len(response) == 10, response.hex()
        assert rc_of(response) == expected, (hex(rc_of(response)), hex(expected))
        # and the thief's session is untouched by all of it
        assert usable(thief, taken)
    assert space_sessions(thief) == [taken]
    # the owner's other session and new sessions work as ever
    assert rc_of(owner.send(get_random_with_session(kept))) == RC_ATTRIBUTES_S1
    thief.flush(taken)
    fresh = owner.start_session(TPM_SE.POLICY)
    assert usable(owner, fresh)
    for client in (owner, holder, thief):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_evicted_token_session_is_a_dead_token(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_timeout=0.2, session_evict_after=0.05))
    saver, holder = new_client(rm), new_client(rm)
    saved = saver.start_session(TPM_SE.POLICY)
    blob = saver.context_save(saved)
    fill(holder, TPM_SESSIONS - 1)
    time.sleep(0.25)
    for session in space_sessions(holder):
        assert usable(holder, session)
    waiter = new_client(rm)
    taken = handle_of(rm.submit(waiter.space, start_session_command()).result(5))
    assert taken == saved and rm.wait_stats.evictions == 1
    other = new_client(rm)
    response = other.send(build.context_load_raw(blob))
    assert (len(response), rc_of(response)) == (10, RC_STALE_TOKEN)
    response = saver.send(build.context_load_raw(blob))
    assert (len(response), rc_of(response)) == (10, RC_STALE_TOKEN)
    assert space_sessions(other) == [] and space_sessions(saver) == []
    assert usable(waiter, taken)
    for client in (saver, holder, waiter, other):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_a_session_whose_command_is_queued_is_not_evicted(make_rm: RMFactory) -> None:
    """The worker is busy (a slow command) when the waiter's eviction falls due; x's owner has
    written a command using x meanwhile. x is in flight: the RM must evict y instead."""
    timeout = 0.3
    # Eviction falls due 0.15 s after parking: the slow command must have started by then
    # (slack for a loaded machine) and holds the worker 0.2 s beyond it.
    rm = make_rm(config(session_timeout=timeout, session_evict_after=0.15), wrap=FaultyBackend)
    faulty = rm.backend
    assert isinstance(faulty, FaultyBackend)
    sx, sy, holder, slow, waiter = (new_client(rm) for _ in range(5))
    x = sx.start_session(TPM_SE.POLICY)
    time.sleep(0.02)
    y = sy.start_session(TPM_SE.POLICY)
    fill(holder, TPM_SESSIONS - 2)
    time.sleep(timeout + 0.05)
    for session in space_sessions(holder):
        assert usable(holder, session)
    waiting = park(rm, waiter)
    faulty.slow(0.35, {TPM_CC.GetRandom})
    mark = faulty.mark()
    slow_future = rm.submit(slow.space, build.get_random(8))
    assert faulty.wait_started(TPM_CC.GetRandom, mark)
    in_flight = rm.submit(sx.space, policy_restart_command(x))  # queued behind the slow one
    assert rc_of(slow_future.result(5)) == 0
    faulty.heal()
    response = in_flight.result(5)
    taken = handle_of(waiting.result(5))
    assert rc_of(response) == 0, f"x was evicted under its owner's command: {rc_of(response):#x}"
    assert taken & INDEX == y & INDEX
    assert usable(sx, x)
    for client in (sx, sy, holder, slow, waiter):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


# -- the bound ---------------------------------------------------------------------------------


def test_refused_after_session_wait_max_when_nothing_is_old_enough(make_rm: RMFactory) -> None:
    wait_max = 0.3
    rm = make_rm(config(session_timeout=60.0, session_evict_after=0.05, session_wait_max=wait_max))
    holder, waiter = new_client(rm), new_client(rm)
    held = fill(holder, TPM_SESSIONS)
    started = time.monotonic()
    response = waiter.send(start_session_command())
    waited = time.monotonic() - started
    print(f"\nrefused after {waited * 1e3:.0f} ms (session_wait_max {wait_max * 1e3:.0f} ms)")
    assert (len(response), rc_of(response)) == (10, RC_RM_SESSION_HANDLES)
    assert waited >= wait_max  # not refused before the bound
    assert rm.wait_stats.refused == 1 and rm.wait_stats.evictions == 0
    assert all(usable(holder, s) for s in held)
    # the refused space goes on; with a free session it gets one at once
    holder.flush(held[0])
    session = waiter.start_session(TPM_SE.POLICY)
    assert usable(waiter, session)
    rm.close_space(holder.space)
    rm.close_space(waiter.space)
    assert_tpm_empty(rm)


def test_refused_after_session_wait_max_when_all_sessions_stay_busy(make_rm: RMFactory) -> None:
    timeout, wait_max = 0.3, 0.6
    rm = make_rm(
        config(session_timeout=timeout, session_evict_after=0.05, session_wait_max=wait_max)
    )
    holders = [new_client(rm) for _ in range(4)]
    held = [(h, s) for h in holders for s in fill(h, TPM_SESSIONS // 4)]
    stop = threading.Event()
    failures: list[int] = []
    passes = [0]

    def keep_busy() -> None:
        while not stop.is_set():
            for client, session in held:
                rc = rc_of(client.send(policy_restart_command(session)))
                if rc:
                    failures.append(rc)
            passes[0] += 1

    user = threading.Thread(target=keep_busy)
    user.start()
    try:
        waiter = new_client(rm)
        started = time.monotonic()
        response = waiter.send(start_session_command())
        waited = time.monotonic() - started
    finally:
        stop.set()
        user.join(5)
    print(f"\nall busy: refused after {waited * 1e3:.0f} ms; {passes[0]} passes over 64 sessions")
    assert failures == []
    assert passes[0] >= 2
    assert (len(response), rc_of(response)) == (10, RC_RM_SESSION_HANDLES)
    assert waited >= wait_max  # not refused before the bound
    assert rm.wait_stats.evictions == 0 and rm.wait_stats.refused == 1
    for client in [*holders, waiter]:
        rm.close_space(client.space)
    assert_tpm_empty(rm)


# -- sessions the RM does not hold -------------------------------------------------------------


class SharedTPM(Backend):
    """The real TPM, also used by someone other than the RM (firmware, another stack): the
    test sends that user's commands straight to the TPM, serialized with the RM's."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = f"shared:{inner.name}"
        self.lock = threading.Lock()
        self.rcs: list[int] = []

    def transmit(self, command: bytes) -> bytes:
        with self.lock:
            response = self.inner.transmit(command)
        self.rcs.append(rc_of(response))
        return response

    def outsider(self, command: bytes) -> bytes:
        with self.lock:
            return self.inner.transmit(command)

    def cancel(self) -> None:
        self.inner.cancel()

    def close(self) -> None:
        self.inner.close()


def test_sessions_held_outside_the_rm_never_show_the_tpm_905(make_rm: RMFactory) -> None:
    rm = make_rm(config(session_evict_after=0.05, session_wait_max=0.4), wrap=SharedTPM)
    shared = rm.backend
    assert isinstance(shared, SharedTPM)
    outside = []
    for _ in range(4):
        handle = handle_of(shared.outsider(start_session_command()))
        # saved, so it takes none of the TPM's 3 loaded-session slots, but stays active
        assert rc_of(shared.outsider(build.context_save(handle))) == 0
        outside.append(handle)
    holder = new_client(rm)
    held = fill(holder, TPM_SESSIONS - len(outside))
    assert len(rm.sessions) == TPM_SESSIONS - len(outside)  # the RM thinks there is room
    waiter = new_client(rm)
    # nobody frees anything: the RM's own refusal, after the bound
    response = waiter.send(start_session_command())
    assert (len(response), rc_of(response)) == (10, RC_RM_SESSION_HANDLES)
    assert RC_SESSION_HANDLES in shared.rcs  # the TPM did say 0x905 to the RM
    # the outsider frees one while the waiter waits: the waiter gets it
    future = park(rm, waiter)
    time.sleep(0.1)
    assert rc_of(shared.outsider(build.flush_context(outside.pop()))) == 0
    session = handle_of(never_tpm_905(future.result(5)))
    assert usable(waiter, session)
    assert all(usable(holder, s) for s in held)
    for client in (holder, waiter):
        rm.close_space(client.space)
    for handle in outside:
        assert rc_of(shared.outsider(build.flush_context(handle))) == 0
    assert_tpm_empty(rm)


def test_over_the_space_limit_is_refused_at_once_even_while_others_wait(
    make_rm: RMFactory,
) -> None:
    """The per-space limit is checked before anything runs: a space at its limit gets
    0x000B0903 at once, not a place in the queue for a session it may not have (and not
    0x000B0905 after session_wait_max: the waiter, parked first, is still waiting when the
    refusal comes)."""
    wait_max = 10.0
    rm = make_rm(
        RMConfig(
            max_sessions=2, session_timeout=60, session_evict_after=0.05, session_wait_max=wait_max
        )
    )
    holders = [new_client(rm) for _ in range(TPM_SESSIONS // 2)]
    for holder in holders:
        fill(holder, 2)
    waiter = new_client(rm)
    waiting = park(rm, waiter)
    response = holders[0].send(start_session_command())
    assert (len(response), rc_of(response)) == (10, RC_RM_SESSION_MEMORY), hex(rc_of(response))
    assert not waiting.done()  # answered while the earlier waiter still waits
    assert rm.wait_stats.waited == 1 and rm.wait_stats.refused == 0
    # the waiter still gets the next freed session
    holders[1].flush(space_sessions(holders[1])[0])
    assert rc_of(waiting.result(5)) == 0
    for client in [*holders, waiter]:
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_wait_bound_holds_when_eviction_comes_later_than_the_bound(make_rm: RMFactory) -> None:
    """session_wait_max bounds the wait whatever session_evict_after says (a large
    session_evict_after is how one turns eviction off). Eviction an hour away: a wait
    bounded only by it would hang, and the 30 s guard fails it (no speed is measured)."""
    wait_max, evict_after = 0.3, 3600.0
    rm = make_rm(config(session_evict_after=evict_after, session_wait_max=wait_max))
    holder, waiter = new_client(rm), new_client(rm)
    fill(holder, TPM_SESSIONS)
    started = time.monotonic()
    response = rm.submit(waiter.space, start_session_command()).result(30)
    waited = time.monotonic() - started
    assert (len(response), rc_of(response)) == (10, RC_RM_SESSION_HANDLES)
    assert waited >= wait_max  # not refused before the bound
    assert rm.wait_stats.refused == 1 and rm.wait_stats.evictions == 0
    for client in (holder, waiter):
        rm.close_space(client.space)
    assert_tpm_empty(rm)
