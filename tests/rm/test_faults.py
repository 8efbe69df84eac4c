"""The RM under failures of the TPM behind it: refused swaps, a broken transport, RETRY
answers, a slow TPM and cancellation. Faults are injected by wrapping the real libtpms
backend (tests/rm/faults.py); everything else is the real TPM.

Contract (DESIGN.md): a TPM error during the RM's own swap never crashes the daemon and never
leaks a slot; the affected space gets an errno (the kernel's mapping: HANDLE/REFERENCE_H0 →
ENOENT, INTEGRITY → EINVAL, others → EFAULT) and loses only the entries that were lost; every
other space goes on. A transport failure is EIO; once the backend works again the RM serves
normally. RETRY/TESTING/YIELDED are retried with the kernel's bounded backoff.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable

import pytest

from cusetpm.backends.base import Backend
from cusetpm.rm import ResourceManager, RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_HR_HANDLE_MASK, TPM_RH, TPM_SE
from tests.rm.client import (
    ALG_AES,
    ALG_CFB,
    ALG_NULL,
    ALG_RSA,
    ALG_SHA256,
    EMPTY_SENSITIVE,
    NO_OUTSIDE_INFO_NO_PCRS,
    STORAGE_ATTRS,
    RawClient,
    ecc_signing_template,
    policy_get_digest_command,
    policy_restart_command,
    pw_session,
    raw_command,
    rc_of,
    space_objects,
    space_sessions,
    with_unique,
)
from tests.rm.conftest import RMFactory, assert_tpm_empty
from tests.rm.faults import FaultyBackend

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

FAST_RETRY = RMConfig(retry_first_delay=0.001, retry_max_delay=0.01)

RC_INTEGRITY_P1 = 0x1DF  # TPM_RC_INTEGRITY + TPM_RC_P + TPM_RC_1
RC_HANDLE_P1 = 0x1CB  # TPM_RC_HANDLE + TPM_RC_P + TPM_RC_1
RC_REFERENCE_H0 = 0x910
RC_MEMORY = 0x904
RC_RETRY = 0x922
RC_TESTING = 0x90A
RC_YIELDED = 0x908
RC_CANCELED = 0x909
RETRY_RCS = [
    pytest.param(RC_RETRY, id="RETRY"),
    pytest.param(RC_TESTING, id="TESTING"),
    pytest.param(RC_YIELDED, id="YIELDED"),
]

# (rc, errno the space must get, does the rc say the handle is gone from the TPM)
CONTEXT_FAILURES = [
    pytest.param(RC_INTEGRITY_P1, errno.EINVAL, False, id="INTEGRITY"),
    pytest.param(RC_HANDLE_P1, errno.ENOENT, True, id="HANDLE"),
    pytest.param(RC_REFERENCE_H0, errno.ENOENT, True, id="REFERENCE_H0"),
    pytest.param(RC_MEMORY, errno.EFAULT, False, id="MEMORY"),
]
# A ContextLoad refused for lack of TPM memory loses nothing (see test_*_load_memory_full).
CONTEXT_LOAD_FAILURES = CONTEXT_FAILURES[:-1]


@pytest.fixture
def faulty(make_rm: RMFactory) -> tuple[ResourceManager, FaultyBackend]:
    rm = make_rm(config=FAST_RETRY, wrap=FaultyBackend)
    assert isinstance(rm.backend, FaultyBackend)
    return rm, rm.backend


def new_client(rm: ResourceManager) -> RawClient:
    return RawClient(rm, rm.open_space())


def make_key(client: RawClient, tag: bytes) -> int:
    return client.create_primary(with_unique(ecc_signing_template(), tag))


def rsa2048_storage_template() -> bytes:
    params = struct.pack(">HHHHHI", ALG_AES, 128, ALG_CFB, ALG_NULL, 2048, 0)
    body = struct.pack(">HHIH", ALG_RSA, ALG_SHA256, STORAGE_ATTRS, 0) + params + b"\0\0"
    return struct.pack(">H", len(body)) + body


def create_primary_command(template: bytes) -> bytes:
    params = EMPTY_SENSITIVE + template + NO_OUTSIDE_INFO_NO_PCRS
    return raw_command(TPM_CC.CreatePrimary, [TPM_RH.OWNER], params, pw_session())


def assert_idle_tpm(rm: ResourceManager, *clients: RawClient) -> None:
    """Between commands the TPM holds nothing loaded, and the saved sessions in it are exactly
    the ones the open spaces own (by session index): no slot leaked, none lost."""
    census = rm.tpm_census()
    assert census["transient"] == [], census
    assert census["loaded_sessions"] == [], census
    owned = sorted(h & TPM_HR_HANDLE_MASK for c in clients for h in c.space.sessions)
    assert sorted(h & TPM_HR_HANDLE_MASK for h in census["saved_sessions"]) == owned, census


def assert_space_works(client: RawClient, tag: bytes) -> None:
    """The space serves: GetRandom, and a new object is created, usable and listed."""
    assert len(client.get_random(8)) == 8
    handle = make_key(client, tag)
    client.read_public(handle)
    assert handle in space_objects(client)


def expect_loss_reported(
    action: Callable[[], object], err: int, still_there: Callable[[], bool]
) -> None:
    """An injected failure of the RM's own ContextSave loses the entry (the TPM has no copy
    the RM could use): the space gets `err` (the kernel's mapping) and no longer lists it.
    Never a silent loss (success answered, entry gone), never an error for a kept entry."""
    with pytest.raises(RMError) as info:
        action()
    assert info.value.errno == err, info.value
    assert not still_there(), "the space got an error but still lists the entry"


# -- the RM's own ContextLoad / ContextSave / FlushContext refused ----------------------------


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_LOAD_FAILURES)
def test_object_context_load_failure(faulty, rc, err, gone):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1, a2 = make_key(a, b"a1"), make_key(a, b"a2")
    b1 = make_key(b, b"b1")
    fault = tpm.fail(TPM_CC.ContextLoad, rc, vanish=gone)
    with pytest.raises(RMError) as info:
        a.read_public(a1)
    assert fault.fired == 1
    assert info.value.errno == err
    assert space_objects(a) == [a2], "the lost object must leave the space, the other stays"
    assert_idle_tpm(rm, a, b)
    a.read_public(a2)
    b.read_public(b1)
    assert space_objects(b) == [b1]
    assert_space_works(a, b"a3")
    assert_space_works(b, b"b2")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_LOAD_FAILURES)
def test_session_context_load_failure(faulty, rc, err, gone):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    s1 = a.start_session(TPM_SE.POLICY)
    s2 = a.start_session(TPM_SE.POLICY)
    sb = b.start_session(TPM_SE.POLICY)
    fault = tpm.fail(TPM_CC.ContextLoad, rc, vanish=gone)
    with pytest.raises(RMError) as info:
        a.send(policy_restart_command(s1))
    assert fault.fired == 1
    assert info.value.errno == err
    assert space_sessions(a) == [s2]
    # The session the RM could not load must not stay behind in the TPM as a saved session.
    assert_idle_tpm(rm, a, b)
    assert rc_of(a.send(policy_restart_command(s2))) == 0
    assert rc_of(b.send(policy_get_digest_command(sb))) == 0
    assert_space_works(a, b"a")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize("rc", [RC_MEMORY, 0x902], ids=["MEMORY", "OBJECT_MEMORY"])
def test_object_load_memory_full(faulty, rc):
    """The TPM has no room for the RM's ContextLoad (firmware may hold slots the RM does not
    own): the command is refused with the TPM's code, the object stays, a retry works."""
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1 = make_key(a, b"a1")
    b1 = make_key(b, b"b1")
    fault = tpm.fail(TPM_CC.ContextLoad, rc)
    response = a.send(build.read_public(a1))
    assert fault.fired == 1
    assert rc_of(response) == rc
    assert space_objects(a) == [a1]
    assert_idle_tpm(rm, a, b)
    a.read_public(a1)
    b.read_public(b1)
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_session_load_memory_full(faulty):
    rm, tpm = faulty
    a = new_client(rm)
    s1 = a.start_session(TPM_SE.POLICY)
    fault = tpm.fail(TPM_CC.ContextLoad, RC_MEMORY)
    assert rc_of(a.send(policy_restart_command(s1))) == RC_MEMORY
    assert fault.fired == 1
    assert space_sessions(a) == [s1]
    assert_idle_tpm(rm, a)
    assert rc_of(a.send(policy_restart_command(s1))) == 0
    rm.close_space(a.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_FAILURES)
def test_new_object_context_save_failure(faulty, rc, err, gone):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1 = make_key(a, b"a1")
    b1 = make_key(b, b"b1")
    fault = tpm.fail(TPM_CC.ContextSave, rc, vanish=gone)

    def listed() -> bool:
        return space_objects(a) != [a1]

    expect_loss_reported(lambda: make_key(a, b"a2"), err, listed)
    assert fault.fired == 1
    assert_idle_tpm(rm, a, b)
    a.read_public(a1)
    b.read_public(b1)
    assert_space_works(b, b"b2")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_FAILURES)
def test_session_context_save_failure(faulty, rc, err, gone):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    s1 = a.start_session(TPM_SE.POLICY)
    s2 = a.start_session(TPM_SE.HMAC)
    sb = b.start_session(TPM_SE.POLICY)
    fault = tpm.fail(TPM_CC.ContextSave, rc, vanish=gone)
    expect_loss_reported(
        lambda: a.send(policy_restart_command(s1)), err, lambda: s1 in space_sessions(a)
    )
    assert fault.fired == 1
    assert s2 in space_sessions(a)
    assert_idle_tpm(rm, a, b)
    assert rc_of(b.send(policy_restart_command(sb))) == 0
    assert_space_works(a, b"a")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_FAILURES)
def test_new_session_context_save_failure(faulty, rc, err, gone):
    """StartAuthSession ran, but the RM cannot save the new session: it is flushed, and the
    client is told (the kernel's errno), not handed a session that does not exist."""
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    sb = b.start_session(TPM_SE.POLICY)
    fault = tpm.fail(TPM_CC.ContextSave, rc, vanish=gone)
    with pytest.raises(RMError) as info:
        a.start_session(TPM_SE.HMAC)
    assert fault.fired == 1
    assert info.value.errno == err
    assert space_sessions(a) == []
    assert_idle_tpm(rm, a, b)
    assert rc_of(b.send(policy_restart_command(sb))) == 0
    s1 = a.start_session(TPM_SE.POLICY)
    assert rc_of(a.send(policy_restart_command(s1))) == 0
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("rc", "err", "gone"), CONTEXT_FAILURES)
def test_object_flush_failure(faulty, rc, err, gone):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1 = make_key(a, b"a1")
    b1 = make_key(b, b"b1")
    fault = tpm.fail(TPM_CC.FlushContext, rc, vanish=gone)
    # The object's saved context is good: a refused flush after use loses nothing (a slot
    # left taken is reconciled before the next command), so the command succeeds.
    a.read_public(a1)
    assert fault.fired == 1
    assert a1 in space_objects(a)
    a.context_save(a1)  # the next command on it (not a ReadPublic: the RM answers that itself)
    assert_idle_tpm(rm, a, b)
    b.read_public(b1)
    assert_space_works(a, b"a2")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_failure_in_close_space_leaves_nothing(faulty):
    """A space closing while its session flush is refused once: the RM flushes it again
    before the close completes, so the TPM's session slot is not lost."""
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    sa = a.start_session(TPM_SE.POLICY)
    make_key(a, b"a1")
    b1 = make_key(b, b"b1")
    sb = b.start_session(TPM_SE.POLICY)
    mark = tpm.mark()
    fault = tpm.fail(TPM_CC.FlushContext, RC_MEMORY)
    rm.close_space(a.space)
    assert fault.fired == 1
    flushes = [
        c for c in tpm.reached_tpm(mark) if int.from_bytes(c[6:10], "big") == TPM_CC.FlushContext
    ]
    assert [int.from_bytes(c[10:14], "big") for c in flushes] == [sa], "flushed again"
    assert_idle_tpm(rm, b)  # only b's session is saved in the TPM
    b.read_public(b1)
    assert rc_of(b.send(policy_restart_command(sb))) == 0
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def test_session_flush_refused_at_close_until_later(faulty):
    """The TPM refuses the close's flush and the retry: the session is flushed before the
    next command of anyone, and nothing is left once that ran."""
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a.start_session(TPM_SE.POLICY)
    b1 = make_key(b, b"b1")
    fault = tpm.fail(TPM_CC.FlushContext, RC_MEMORY, times=2)
    rm.close_space(a.space)
    assert fault.fired == 2
    assert len(rm.tpm_census()["saved_sessions"]) == 1  # still there: the TPM refused twice
    b.read_public(b1)  # reconciles first
    assert_idle_tpm(rm, b)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


# -- transport failures -------------------------------------------------------------------------


def test_transport_failure_on_client_command(faulty):
    rm, tpm = faulty
    a = new_client(rm)
    tpm.break_transport(TPM_CC.GetRandom)
    with pytest.raises(RMError) as info:
        a.get_random(8)
    assert info.value.errno == errno.EIO
    assert len(a.get_random(8)) == 8
    rm.close_space(a.space)
    assert_tpm_empty(rm)


def test_backend_outage_then_recovery(faulty):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1 = make_key(a, b"a1")
    sa = a.start_session(TPM_SE.POLICY)
    b1 = make_key(b, b"b1")
    tpm.break_transport(times=None)
    for action in (
        lambda: a.read_public(a1),
        lambda: a.send(policy_restart_command(sa)),
        lambda: b.get_random(8),
        lambda: make_key(b, b"b2"),
        lambda: b.read_public(b1),
    ):
        with pytest.raises(RMError) as info:
            action()
        assert info.value.errno == errno.EIO
    tpm.heal()
    a.read_public(a1)
    assert rc_of(a.send(policy_restart_command(sa))) == 0
    b.read_public(b1)
    assert space_objects(a) == [a1] and space_objects(b) == [b1]
    assert space_sessions(a) == [sa]
    assert_idle_tpm(rm, a, b)
    assert_space_works(b, b"b3")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


# ReadPublic of a key is ContextLoad, ReadPublic, FlushContext at the TPM; PolicyRestart of a
# session is ContextLoad, PolicyRestart, ContextSave. Break the transport at each of them,
# before the TPM runs it or after (the answer is lost), then let it work again.
MID_SWAP = [
    pytest.param(nth, after, id=f"{nth}-{'after' if after else 'before'}")
    for nth in (1, 2, 3)
    for after in (False, True)
]


# 1-after is the hard case: the TPM loaded the object but the answer (its physical handle)
# was lost. The RM must still clean up, without flushing what it did not create (see
# test_reconcile_spares_firmware_objects).
@pytest.mark.parametrize(("nth", "after_send"), MID_SWAP)
def test_transport_failure_mid_swap_object(faulty, nth, after_send):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    a1 = make_key(a, b"a1")
    b1 = make_key(b, b"b1")
    tpm.break_transport(nth=nth, after_send=after_send)
    with pytest.raises(RMError) as info:
        a.read_public(a1)
    assert info.value.errno == errno.EIO
    tpm.heal()
    if a1 in space_objects(a):
        a.read_public(a1)
    b.read_public(b1)
    assert_idle_tpm(rm, a, b)  # nothing the RM loaded stays behind in a TPM slot
    assert_space_works(a, b"a2")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize(("nth", "after_send"), MID_SWAP)
def test_transport_failure_mid_swap_session(faulty, nth, after_send):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    sa = a.start_session(TPM_SE.POLICY)
    sb = b.start_session(TPM_SE.POLICY)
    tpm.break_transport(nth=nth, after_send=after_send)
    with pytest.raises(RMError) as info:
        a.send(policy_restart_command(sa))
    assert info.value.errno == errno.EIO
    tpm.heal()
    if sa in space_sessions(a):
        assert rc_of(a.send(policy_restart_command(sa))) == 0
    assert rc_of(b.send(policy_restart_command(sb))) == 0
    assert_idle_tpm(rm, a, b)
    assert_space_works(a, b"a")
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_reconcile_spares_firmware_objects(make_rm: RMFactory):
    """A transient object loaded before the RM started (firmware such as tboot holds one) is
    not the RM's: cleaning up after a lost answer must leave it loaded."""
    firmware: list[int] = []

    def wrap(backend: Backend) -> FaultyBackend:
        response = backend.transmit(create_primary_command(ecc_signing_template()))
        assert rc_of(response) == 0
        firmware.append(int.from_bytes(response[10:14], "big"))
        return FaultyBackend(backend)

    rm = make_rm(config=FAST_RETRY, wrap=wrap)
    tpm = rm.backend
    assert isinstance(tpm, FaultyBackend)
    a = new_client(rm)
    a1 = make_key(a, b"a1")
    # ContextSave of the object: a command that loads it every time (the RM answers a
    # repeated ReadPublic itself)
    for nth, after_send in ((1, True), (3, False), (2, True)):
        tpm.break_transport(nth=nth, after_send=after_send)
        with pytest.raises(RMError) as info:
            a.context_save(a1)
        assert info.value.errno == errno.EIO, info.value
        tpm.heal()
        if a1 not in space_objects(a):
            a1 = make_key(a, b"a1")
        a.context_save(a1)
        assert rm.tpm_census()["transient"] == firmware
    rm.close_space(a.space)
    census = rm.tpm_census()
    assert census == {"transient": firmware, "loaded_sessions": [], "saved_sessions": []}
    tpm.inner.transmit(build.flush_context(firmware[0]))


def test_repeated_transport_failures_do_not_exhaust_tpm(faulty):
    """The consequence of a slot leaked on a transport failure: libtpms has 3 object slots
    and 3 loaded-session slots. Ten broken flushes/saves later the RM must still serve."""
    rm, tpm = faulty
    a = new_client(rm)
    a1 = make_key(a, b"a1")
    s1 = a.start_session(TPM_SE.POLICY)
    for i in range(10):
        tpm.break_transport(TPM_CC.FlushContext)
        with pytest.raises(RMError) as info:
            a.read_public(make_key(a, b"k%d" % i))
        assert info.value.errno == errno.EIO, info.value
        tpm.heal()
        tpm.break_transport(TPM_CC.ContextSave)
        with pytest.raises(RMError) as info:
            a.send(policy_restart_command(s1))
        assert info.value.errno == errno.EIO, info.value
        tpm.heal()
        if s1 not in space_sessions(a):
            s1 = a.start_session(TPM_SE.POLICY)
    a.read_public(a1)
    assert_space_works(a, b"end")
    s = a.start_session(TPM_SE.POLICY)
    assert rc_of(a.send(policy_restart_command(s))) == 0
    rm.close_space(a.space)
    assert_tpm_empty(rm)


# -- RETRY / TESTING / YIELDED ---------------------------------------------------------------


def attempts_of(tpm: FaultyBackend, mark: int, code: int) -> int:
    return sum(1 for s in tpm.since(mark) if s.code == code)


def kernel_attempts(first: float, longest: float) -> int:
    """tpm_transmit: send; while RETRY/TESTING and delay <= longest: sleep(delay), delay *= 2,
    send again. 20 ms and 2 s give sleeps 20..1280 ms: 8 attempts."""
    attempts, delay = 1, first
    while delay <= longest:
        attempts, delay = attempts + 1, delay * 2
    return attempts


def test_kernel_backoff_numbers():
    assert kernel_attempts(0.020, 2.0) == 8
    assert kernel_attempts(0.001, 0.01) == 5


@pytest.mark.parametrize("rc", RETRY_RCS)
@pytest.mark.parametrize("times", [1, 3])
def test_retry_then_success(faulty, rc, times):
    rm, tpm = faulty
    a = new_client(rm)
    tpm.fail(TPM_CC.GetRandom, rc, times=times)
    mark = tpm.mark()
    assert len(a.get_random(8)) == 8
    assert attempts_of(tpm, mark, TPM_CC.GetRandom) == times + 1
    rm.close_space(a.space)


@pytest.mark.parametrize("rc", RETRY_RCS)
def test_endless_retry_is_bounded(faulty, rc):
    rm, tpm = faulty
    a = new_client(rm)
    tpm.fail(TPM_CC.GetRandom, rc, times=None)
    mark = tpm.mark()
    started = time.monotonic()
    response = a.send(build.get_random(8))
    elapsed = time.monotonic() - started
    assert rc_of(response) == rc
    expected = kernel_attempts(FAST_RETRY.retry_first_delay, FAST_RETRY.retry_max_delay)
    assert attempts_of(tpm, mark, TPM_CC.GetRandom) == expected
    assert elapsed >= 0.001 + 0.002 + 0.004 + 0.008  # it really slept between attempts
    tpm.heal()
    assert len(a.get_random(8)) == 8
    rm.close_space(a.space)


def test_endless_retry_kernel_ratio(make_rm: RMFactory):
    """The kernel's 20 ms → 2 s (ratio 100) scaled by 1/20: 8 attempts, as the kernel."""
    rm = make_rm(config=RMConfig(retry_first_delay=0.001, retry_max_delay=0.1), wrap=FaultyBackend)
    tpm = rm.backend
    assert isinstance(tpm, FaultyBackend)
    a = new_client(rm)
    tpm.fail(TPM_CC.GetRandom, RC_RETRY, times=None)
    mark = tpm.mark()
    assert rc_of(a.send(build.get_random(8))) == RC_RETRY
    assert attempts_of(tpm, mark, TPM_CC.GetRandom) == kernel_attempts(0.020, 2.0) == 8
    rm.close_space(a.space)


def test_retry_on_rm_own_swap(faulty):
    rm, tpm = faulty
    a = new_client(rm)
    a1 = make_key(a, b"a1")
    s = a.start_session(TPM_SE.POLICY)
    tpm.fail(TPM_CC.ContextLoad, RC_RETRY, times=2)
    tpm.fail(TPM_CC.FlushContext, RC_YIELDED, times=1)
    a.read_public(a1)
    tpm.fail(TPM_CC.ContextSave, RC_TESTING, times=2)
    assert rc_of(a.send(policy_restart_command(s))) == 0
    assert space_objects(a) == [a1] and space_sessions(a) == [s]
    assert_idle_tpm(rm, a)
    rm.close_space(a.space)
    assert_tpm_empty(rm)


# -- slow TPM: FIFO order, cancellation --------------------------------------------------------


def test_fifo_order_across_spaces(faulty):
    rm, tpm = faulty
    tpm.slow(0.002, {TPM_CC.GetRandom})
    clients = [new_client(rm) for _ in range(4)]
    per_client = 8
    submitted: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    mark = tpm.mark()

    def run(index: int, client: RawClient) -> None:
        try:
            for j in range(per_client):
                size = 1 + index * per_client + j  # unique per command: its identity
                with lock:
                    future = rm.submit(client.space, build.get_random(size))
                    submitted.append(size)
                assert len(build.parse_get_random(future.result(timeout=10))) == size
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    seen = [
        int.from_bytes(c[10:12], "big")
        for c in tpm.reached_tpm(mark)
        if int.from_bytes(c[6:10], "big") == TPM_CC.GetRandom
    ]
    assert seen == submitted
    assert len(seen) == 4 * per_client


def test_cancel_queued_command(faulty):
    rm, tpm = faulty
    a, b = new_client(rm), new_client(rm)
    tpm.slow(0.2, {TPM_CC.GetRandom})
    mark = tpm.mark()
    running = rm.submit(a.space, build.get_random(5))
    assert tpm.wait_started(TPM_CC.GetRandom, mark)
    queued = rm.submit(b.space, build.get_random(7))
    rm.cancel(b.space)
    with pytest.raises(RMError) as info:
        queued.result(timeout=5)
    assert info.value.errno == errno.EINTR
    assert len(build.parse_get_random(running.result(timeout=5))) == 5
    sizes = [int.from_bytes(c[10:12], "big") for c in tpm.reached_tpm(mark)]
    assert sizes == [5], "the cancelled command must never reach the TPM"
    tpm.heal()
    assert len(b.get_random(7)) == 7  # the space is usable again (not left busy)
    for c in (a, b):
        rm.close_space(c.space)


def test_cancel_running_rsa_keygen(faulty):
    rm, tpm = faulty
    a = new_client(rm)
    template = rsa2048_storage_template()
    outcomes: list[int] = []
    for _ in range(20):
        mark = tpm.mark()
        future = rm.submit(a.space, create_primary_command(template))
        assert tpm.wait_started(TPM_CC.CreatePrimary, mark)
        time.sleep(0.002)
        rm.cancel(a.space)
        rc = rc_of(future.result(timeout=30))
        outcomes.append(rc)
        if rc == RC_CANCELED:
            break
    assert outcomes[-1] == RC_CANCELED, [hex(r) for r in outcomes]
    # Every attempt before the cancelled one ran to completion and left its key in the space;
    # the cancelled one left nothing.
    assert all(r == 0 for r in outcomes[:-1]), [hex(r) for r in outcomes]
    assert len(space_objects(a)) == len(outcomes) - 1
    # A cancelled command leaves the TPM and the space fine.
    assert_space_works(a, b"after")
    rm.close_space(a.space)
    assert_tpm_empty(rm)
