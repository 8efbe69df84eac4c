"""Fair scheduling (rm/scheduler.py) over a real libtpms: quick commands before slow ones,
aging, a fair share per uid; and `fifo` keeps arrival order.

The queue is built deterministically: a command is held at the backend (in flight, before the
TPM) while the others are queued, then released; the order in which commands then reach the
TPM is the scheduler's decision. Nothing here asserts on wall-clock time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace

import pytest

from cusetpm.rm import ResourceManager, RMConfig
from cusetpm.rm.scheduler import TPM_ALG_RSA, duration_key, key_type
from cusetpm.rm.space import Space
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC
from tests.rm.client import RawClient, ecc_signing_template, rc_of, with_unique
from tests.rm.conftest import RMFactory, assert_tpm_empty
from tests.rm.faults import FaultyBackend, command_code
from tests.rm.test_faults import create_primary_command, rsa2048_storage_template


def serve(make_rm: RMFactory, schedule: str) -> tuple[ResourceManager, FaultyBackend]:
    rm = make_rm(config=RMConfig(schedule=schedule), wrap=FaultyBackend)
    assert isinstance(rm.backend, FaultyBackend)
    return rm, rm.backend


def get_random_sizes(tpm: FaultyBackend, mark: int) -> list[int]:
    return [
        int.from_bytes(c[10:12], "big") for c in tpm.reached_tpm(mark)
        if command_code(c) == TPM_CC.GetRandom
    ]


def order_at_tpm(tpm: FaultyBackend, mark: int) -> list[str]:
    """'keygen' / 'random:<size>' for the client commands that reached the TPM since mark."""
    order = []
    for c in tpm.reached_tpm(mark):
        if command_code(c) == TPM_CC.CreatePrimary:
            order.append("keygen")
        elif command_code(c) == TPM_CC.GetRandom:
            order.append(f"random:{int.from_bytes(c[10:12], 'big')}")
    return order


def test_key_type_of_create_primary() -> None:
    rsa = create_primary_command(rsa2048_storage_template())
    ecc = create_primary_command(ecc_signing_template())
    assert key_type(rsa) == TPM_ALG_RSA
    assert key_type(ecc) == 0x0023  # TPM_ALG_ECC
    assert duration_key(rsa) != duration_key(ecc)
    assert duration_key(build.get_random(8)) == (TPM_CC.GetRandom, 0)
    assert key_type(rsa[:20]) is None  # truncated: no guess


@pytest.mark.parametrize("schedule", ["fair", "fifo"])
def test_quick_command_behind_slow_ones(make_rm: RMFactory, schedule: str) -> None:
    """A GetRandom queued behind three RSA-2048 CreatePrimary runs right after the command in
    flight (fair), or after all three (fifo, as before)."""
    rm, tpm = serve(make_rm, schedule)
    clients = [RawClient(rm, rm.open_space()) for _ in range(5)]
    gate = tpm.hold(TPM_CC.GetRandom)
    mark = tpm.mark()
    in_flight = rm.submit(clients[0].space, build.get_random(1))
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    keygens = [
        rm.submit(c.space, create_primary_command(rsa2048_storage_template()))
        for c in clients[1:4]
    ]
    quick = rm.submit(clients[4].space, build.get_random(2))
    gate.set()
    for future in [in_flight, quick, *keygens]:
        assert rc_of(future.result(timeout=60)) == 0
    expected = {
        "fair": ["random:1", "random:2", "keygen", "keygen", "keygen"],
        "fifo": ["random:1", "keygen", "keygen", "keygen", "random:2"],
    }
    assert order_at_tpm(tpm, mark) == expected[schedule]
    assert (rm.scheduler.stats.reordered > 0) == (schedule == "fair")
    for c in clients:
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_close_never_overtakes_the_spaces_own_command(make_rm: RMFactory) -> None:
    """RM work (a close) counts as quick, but never runs before its space's queued command."""
    rm, tpm = serve(make_rm, "fair")
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    gate = tpm.hold(TPM_CC.GetRandom)
    mark = tpm.mark()
    in_flight = rm.submit(a.space, build.get_random(1))
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    command = create_primary_command(with_unique(ecc_signing_template(), b"b"))
    created = rm.submit(b.space, command)
    closed = rm.close_space(b.space, wait=False)
    gate.set()
    assert rc_of(created.result(timeout=30)) == 0  # it ran, in its open space
    closed.result(timeout=30)
    in_flight.result(timeout=30)
    rm.close_space(a.space)
    assert_tpm_empty(rm)  # and the close that followed flushed what it made


def test_aging_bound_under_a_stream_of_quick_commands(make_rm: RMFactory) -> None:
    """A slow command is overtaken by quick ones only until its deadline (aging x its FIFO
    wait); from then on it is the next to run, and quick ones go on after it."""
    rm, tpm = serve(make_rm, "fair")
    picks: list[tuple[float, object]] = []
    real_pick = rm.scheduler.pick

    def recording_pick(queue):  # type: ignore[no-untyped-def]
        job = real_pick(queue)
        picks.append((time.monotonic(), job))
        return job

    rm.scheduler.pick = recording_pick  # type: ignore[method-assign]
    quick = [RawClient(rm, rm.open_space()) for _ in range(4)]
    slow_client = RawClient(rm, rm.open_space())
    tpm.slow(0.004, {TPM_CC.GetRandom})  # quick, but long enough for a queue to stay
    stop = threading.Event()
    streams_done = threading.Semaphore(0)

    # Each quick client sends its next command from its answer's completion callback (run
    # before the completing thread picks again): a quick command is always queued, so the
    # slow one can only run by reaching its deadline.
    def stream(client: RawClient) -> None:
        def answered(future: Future[bytes]) -> None:
            assert rc_of(future.result()) == 0
            if stop.is_set():
                streams_done.release()
            else:
                stream(client)

        rm.submit(client.space, build.get_random(4)).add_done_callback(answered)

    gate = tpm.hold(TPM_CC.GetRandom)
    mark = tpm.mark()
    stream(quick[0])
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    for c in quick[1:]:
        stream(c)
    slow = rm.submit(slow_client.space, create_primary_command(ecc_signing_template()))
    gate.set()
    assert rc_of(slow.result(timeout=60)) == 0
    after = len(picks)
    while len(picks) < after + 8:  # quick ones go on after it
        time.sleep(0.01)
    stop.set()
    for _ in quick:
        assert streams_done.acquire(timeout=30)
    slow_index = next(i for i, (_, job) in enumerate(picks) if job.space is slow_client.space)
    slow_job = picks[slow_index][1]
    overtook = [when for when, job in picks[:slow_index] if job.queued_at > slow_job.queued_at]
    assert overtook, "quick commands queued after it should have run first"
    # ... but only before its deadline: then it ran, as overdue, before the quick ones queued
    assert all(when < slow_job.deadline for when in overtook), len(overtook)
    assert picks[slow_index][0] >= slow_job.deadline
    assert rm.scheduler.stats.overdue >= 1
    assert any(job.queued_at < picks[slow_index][0] for _, job in picks[slow_index + 1 :])
    for c in [*quick, slow_client]:
        rm.close_space(c.space)


@pytest.mark.parametrize("schedule", ["fair", "fifo"])
def test_user_with_20_descriptors_vs_user_with_one(make_rm: RMFactory, schedule: str) -> None:
    """uid 1000 loops GetRandom on 20 descriptors, uid 2000 on one: fair gives uid 2000 about
    half of the TPM while both wait; fifo gives it one part in 21. Counts, not times."""
    rm, tpm = serve(make_rm, schedule)
    many = [rm.open_space(uid=1000) for _ in range(20)]
    one = rm.open_space(uid=2000)
    done: Counter[int] = Counter()
    lock = threading.Lock()
    outstanding = [0]
    finished = threading.Event()

    # Each client sends its next command from its answer's completion callback, which runs
    # on the thread that completed it before that thread picks the next job: every client
    # always has a command queued when the scheduler chooses (no thread timing involved).
    def send(space: Space) -> None:
        with lock:
            outstanding[0] += 1
        rm.submit(space, build.get_random(4)).add_done_callback(lambda f: answered(space, f))

    def answered(space: Space, future: Future[bytes]) -> None:
        assert rc_of(future.result()) == 0
        with lock:
            outstanding[0] -= 1
            done[space.uid] += 1
            again = done[2000] < 40
            if not again and outstanding[0] == 0:
                finished.set()
        if again:
            send(space)

    gate = tpm.hold(TPM_CC.GetRandom)
    mark = tpm.mark()
    send(many[0])
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    for space in [*many[1:], one]:
        send(space)
    gate.set()
    assert finished.wait(timeout=120), done
    share = done[1000] / done[2000]
    if schedule == "fair":
        assert share <= 2.0, done  # 60 to 40 seen: the 20 first queued, then turn about
    else:
        assert share >= 19.0, done  # 820 to 40: one turn in 21
    for s in [*many, one]:
        rm.close_space(s)


class CancelWaitsForAnother(FaultyBackend):
    """cancel() reaches the TPM only once another space's key generation has started (or
    after a bound): the window in which a cancel read from a stale `_current` would land on
    the wrong command, made as wide as a test needs."""

    def __init__(self, inner):  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self.other_started = threading.Event()

    def cancel(self) -> None:
        self.other_started.wait(timeout=2.0)
        super().cancel()


def test_cancel_never_hits_another_spaces_command(make_rm: RMFactory) -> None:
    """Space A cancels its command just as it completes, and B's RSA key generation starts:
    B's command must not come back TPM_RC_CANCELED (issue 13 §5)."""
    rm = make_rm(config=RMConfig(schedule="fifo"), wrap=CancelWaitsForAnother)
    tpm = rm.backend
    assert isinstance(tpm, CancelWaitsForAnother)
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    gate = tpm.hold(TPM_CC.GetRandom)
    mark = tpm.mark()
    mine = rm.submit(a.space, build.get_random(4))
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    theirs = rm.submit(b.space, create_primary_command(rsa2048_storage_template()))
    cancelling = threading.Thread(target=rm.cancel, args=(a.space,))
    cancelling.start()

    def release_then_watch() -> None:
        gate.set()  # A's command finishes; B's keygen may start
        if tpm.wait_started(TPM_CC.CreatePrimary, mark, timeout=5):
            tpm.other_started.set()

    watcher = threading.Thread(target=release_then_watch)
    watcher.start()
    assert rc_of(theirs.result(timeout=60)) == 0, "another space's keygen was cancelled"
    rc_of(mine.result(timeout=60))  # A's own outcome may be either
    cancelling.join()
    watcher.join()
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_interrupts_racing_completions_many_times(make_rm: RMFactory) -> None:
    """Cancels from other threads while commands complete (futures are completed outside the
    RM's lock; a completion callback may call back into the RM): no deadlock, every future
    completes, every space is usable after."""
    rm = make_rm()
    spaces = [rm.open_space() for _ in range(4)]
    rounds = 2500
    errors: list[BaseException] = []

    def client(space: Space) -> None:
        try:
            for _ in range(rounds):
                future = rm.submit(space, build.get_random(2))
                # a callback that re-enters the RM, as the file ops' completion does
                future.add_done_callback(lambda f, s=space: rm.open_spaces)
                rm.cancel(space)
                try:
                    future.result(timeout=30)
                except Exception as exc:  # EINTR when the cancel won
                    assert getattr(exc, "errno", None) == 4, exc
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in spaces]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: a client never finished"
    assert not errors, errors[:3]
    for space in spaces:
        assert rc_of(rm.transmit(space, build.get_random(2))) == 0
        rm.close_space(space)


@pytest.mark.parametrize("schedule", ["fair", "fifo"])
def test_waiter_handed_a_session_is_not_overtaken(make_rm: RMFactory, schedule: str) -> None:
    """Sessions exhausted, a StartAuthSession waits. While the flush that frees a session is
    at the TPM, quick commands of other spaces queue up: the waiter handed the freed session
    runs before them (the scheduler never reorders hand-offs), in either mode."""
    from tests.rm.test_exhaustion import TPM_SESSIONS, config, fill, park

    rm = make_rm(config=replace(config(), schedule=schedule), wrap=FaultyBackend)
    tpm = rm.backend
    assert isinstance(tpm, FaultyBackend)
    holder = RawClient(rm, rm.open_space())
    held = fill(holder, TPM_SESSIONS)
    waiter = RawClient(rm, rm.open_space())
    waiting = park(rm, waiter)
    quick = [RawClient(rm, rm.open_space()) for _ in range(3)]
    gate = tpm.hold(TPM_CC.FlushContext)
    mark = tpm.mark()
    flushed = rm.submit(holder.space, build.flush_context(held[0]))
    assert tpm.wait_started(TPM_CC.FlushContext, mark)
    quick_ones = [rm.submit(c.space, build.get_random(2 + i)) for i, c in enumerate(quick)]
    gate.set()
    assert rc_of(flushed.result(timeout=30)) == 0
    assert rc_of(waiting.result(timeout=30)) == 0
    assert all(rc_of(f.result(timeout=30)) == 0 for f in quick_ones)
    order = [
        "session" if command_code(c) == TPM_CC.StartAuthSession
        else f"random:{int.from_bytes(c[10:12], 'big')}"
        for c in tpm.reached_tpm(mark)
        if command_code(c) in (TPM_CC.StartAuthSession, TPM_CC.GetRandom)
    ]
    assert order == ["session", "random:2", "random:3", "random:4"]
    for c in (holder, waiter, *quick):
        rm.close_space(c.space)
    assert_tpm_empty(rm)
