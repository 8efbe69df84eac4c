"""Resident contexts (rm/residency.py): what stays in the TPM, what leaves, and in which order.

libtpms has 3 transient object slots and 3 loaded-session slots (TPM_PT_HR_TRANSIENT_AVAIL,
TPM_PT_HR_LOADED_AVAIL), so a handful of keys is enough to make the RM evict.
"""

from __future__ import annotations

import errno

import pytest

from cusetpm.rm import ResourceManager, RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_HT, TPM_SE
from cusetpm.tpm.rc import TPM_RC
from tests.rm.client import RawClient, policy_restart_command
from tests.rm.conftest import RMFactory, assert_tpm_empty
from tests.rm.faults import FaultyBackend

pytestmark = pytest.mark.residency("resident")


def codes(backend: FaultyBackend, mark: int) -> list[int]:
    return [int.from_bytes(c[6:10], "big") for c in backend.reached_tpm(mark)]


def faulty(make_rm: RMFactory) -> tuple[ResourceManager, FaultyBackend]:
    return faulty_with(make_rm, None)


def faulty_with(make_rm: RMFactory, config: object) -> tuple[ResourceManager, FaultyBackend]:
    wrapped: list[FaultyBackend] = []

    def wrap(backend):  # type: ignore[no-untyped-def]
        wrapped.append(FaultyBackend(backend))
        return wrapped[0]

    rm = make_rm(config, wrap=wrap)
    return rm, wrapped[0]


def resident_objects(rm: ResourceManager) -> int:
    assert rm.residency is not None
    return rm.residency.resident_objects


def test_a_used_key_stays_resident_and_costs_one_tpm_command(make_rm: RMFactory) -> None:
    rm, backend = faulty(make_rm)
    client = RawClient(rm, rm.open_space())
    key = client.create_primary()
    mark = backend.mark()
    for _ in range(5):
        client.send(build.context_save(key))  # needs the key in the TPM: no cache answers it
    assert codes(backend, mark) == [TPM_CC.ContextSave] * 5


def test_least_recently_used_object_is_evicted_first(make_rm: RMFactory) -> None:
    rm, backend = faulty(make_rm)
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    keys = [a.create_primary(), b.create_primary(), a.create_primary()]  # the TPM's 3 slots
    assert resident_objects(rm) == 3
    a.send(build.context_save(keys[0]))  # keys[1] (b's) is now the least recently used
    mark = backend.mark()
    b.create_primary()  # needs a slot: exactly one eviction, of keys[1]
    sent = backend.reached_tpm(mark)
    saves = [c for c in sent if int.from_bytes(c[6:10], "big") == TPM_CC.ContextSave]
    flushes = [c for c in sent if int.from_bytes(c[6:10], "big") == TPM_CC.FlushContext]
    assert len(saves) == 1 and len(flushes) == 1  # a key: saved once, then flushed
    assert rm.residency is not None
    assert b.space.objects[keys[1]].physical is None  # out, its saved context kept
    assert a.space.objects[keys[0]].physical is not None
    assert a.space.objects[keys[2]].physical is not None
    # ... and it comes back when used, under the same virtual handle
    assert int.from_bytes(b.send(build.context_save(keys[1]))[6:10], "big") == 0


def test_an_evicted_key_is_only_flushed_the_second_time(make_rm: RMFactory) -> None:
    rm, backend = faulty(make_rm)
    client = RawClient(rm, rm.open_space())
    keys = [client.create_primary() for _ in range(4)]  # the 4th evicts keys[0]
    client.send(build.context_save(keys[0]))  # back in: evicts keys[1]
    for key in keys[1:]:
        client.send(build.context_save(key))
    mark = backend.mark()
    client.send(build.context_save(keys[0]))  # keys[0] was saved once already
    sent = codes(backend, mark)
    assert sent.count(TPM_CC.FlushContext) == 1
    # the one ContextSave is the client's own; the evicted key is not saved again
    assert sent.count(TPM_CC.ContextSave) == 1 and sent.count(TPM_CC.ContextLoad) == 1


def test_resident_sessions_are_saved_when_slots_run_out(make_rm: RMFactory) -> None:
    rm = make_rm()
    client = RawClient(rm, rm.open_space())
    sessions = [client.start_session(TPM_SE.POLICY) for _ in range(5)]  # 3 loaded slots
    assert rm.residency is not None and rm.residency.resident_sessions == 3
    for s in sessions:  # every one still works: the saved ones come back
        assert int.from_bytes(client.send(policy_restart_command(s))[6:10], "big") == 0


def test_closing_a_space_with_resident_contexts_leaves_nothing(make_rm: RMFactory) -> None:
    rm = make_rm()
    clients = [RawClient(rm, rm.open_space()) for _ in range(3)]
    for c in clients:
        c.create_primary()
        c.start_session(TPM_SE.HMAC)
    census = rm.tpm_census()
    assert census["transient"] and census["loaded_sessions"]
    for c in clients:
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_tpm_census_is_within_the_rms_tables(make_rm: RMFactory) -> None:
    rm = make_rm()
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    for c in (a, b, a, b, a):
        c.create_primary()
    assert rm.residency is not None
    census = rm.tpm_census()
    assert set(census["transient"]) == rm.residency.physical_handles()
    # each space sees only its own objects, whatever is resident
    assert len(a.all_handles(TPM_HT.TRANSIENT << 24)) == 3
    assert len(b.all_handles(TPM_HT.TRANSIENT << 24)) == 2


def test_a_context_save_refused_during_eviction_loses_only_the_victim(make_rm: RMFactory) -> None:
    rm, backend = faulty(make_rm)
    victim_owner, other = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    victim = victim_owner.create_primary()
    kept = [other.create_primary(), other.create_primary()]
    backend.fail(TPM_CC.ContextSave, TPM_RC.INTEGRITY)  # the eviction's save is refused
    other.create_primary()  # evicts `victim`, whose save fails: it is lost
    for key in kept:
        assert int.from_bytes(other.send(build.context_save(key))[6:10], "big") == 0
    with pytest.raises(RMError) as info:
        victim_owner.send(build.context_save(victim))
    assert info.value.errno == errno.EINVAL  # TPM_RC_INTEGRITY, as the kernel maps it
    # the client heard once; the handle is free, and then foreign like any unknown one
    with pytest.raises(RMError) as again:
        victim_owner.send(build.context_save(victim))
    assert again.value.errno == errno.EINVAL
    for c in (victim_owner, other):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_transport_loss_while_contexts_are_resident(make_rm: RMFactory) -> None:
    rm, backend = faulty(make_rm)
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    key_a, key_b = a.create_primary(), b.create_primary()
    b.start_session(TPM_SE.HMAC)
    backend.break_transport(TPM_CC.GetRandom, after_send=True)
    with pytest.raises(RMError) as info:
        a.get_random()
    assert info.value.errno == errno.EIO
    # reconcile kept what the TPM still holds: both keys work, nothing stale is trusted
    for c, key in ((a, key_a), (b, key_b)):
        assert int.from_bytes(c.send(build.context_save(key))[6:10], "big") == 0
    for c in (a, b):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_tpm_reset_under_resident_contexts_loses_them_cleanly(make_rm: RMFactory) -> None:
    """The TPM restarted behind the RM (Shutdown is not sent; Startup(CLEAR) after a reset
    empties it): resident keys are gone; a key never saved is lost with an errno, never the
    TPM's raw answer for a handle it does not know."""
    rm, backend = faulty(make_rm)
    client = RawClient(rm, rm.open_space())
    key = client.create_primary()
    # flush it behind the RM's back: what a reset does to a resident object
    physical = client.space.objects[key].physical
    assert physical is not None
    backend.inner.transmit(build.flush_context(physical))
    backend.break_transport(TPM_CC.GetRandom)  # the RM learns something went wrong ...
    with pytest.raises(RMError):
        client.get_random()
    with pytest.raises(RMError) as info:  # ... reconciles, and the lost key says so
        client.send(build.context_save(key))
    assert info.value.errno == errno.EFAULT
    rm.close_space(client.space)
    assert_tpm_empty(rm)


@pytest.mark.residency("resident", "eager")
def test_get_capability_shows_the_tpms_slots_as_free(residency: str, make_rm: RMFactory) -> None:
    """HR_TRANSIENT_AVAIL reads what an empty TPM has, whatever other spaces keep resident."""
    rm = make_rm()
    a, b = RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())
    b.create_primary()
    b.create_primary()
    response = a.send(build.get_capability(6, 0x207, 1))  # TPM_CAP_TPM_PROPERTIES
    _, data = build.parse_get_capability(response)
    assert [(p.property, p.value) for p in data.properties] == [(0x207, 3)]


def test_keep_free_objects_leaves_a_slot_between_and_during_commands(make_rm: RMFactory) -> None:
    """--keep-free-objects 1 on libtpms' 3 slots: at most 2 of ours between commands, and a
    CreatePrimary leaves one slot free even while it runs."""
    from cusetpm.rm import RMConfig

    rm, backend = faulty_with(make_rm, RMConfig(keep_free_objects=1))
    client = RawClient(rm, rm.open_space())
    for _ in range(4):
        mark = backend.mark()
        client.create_primary()
        assert rm.residency is not None and rm.residency.resident_objects <= 2
        # the TPM's own count when CreatePrimary ran: everything flushed before it, minus
        # what was saved out, leaves at most one of ours beside the new object
        assert len(rm.tpm_census()["transient"]) <= 2
        assert TPM_CC.CreatePrimary in codes(backend, mark)
