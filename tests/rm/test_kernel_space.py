"""The kernel selftests' SpaceTest and AsyncTest cases (tools/testing/selftests/tpm2), rewritten
for the RM's API, plus the kernel's virtual-handle numbering (tpm2-space.c)."""

from __future__ import annotations

import errno
import os

import pytest

from cusetpm.rm import ResourceManager, RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CAP, TPM_PT
from tests.rm.client import RawClient, ecc_storage_template, name_of, rc_of, with_unique
from tests.rm.conftest import assert_tpm_empty

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

TRANSIENT_FIRST = 0x80000000


def distinct_primary(client: RawClient) -> int:
    return client.create_primary(with_unique(ecc_storage_template(), os.urandom(32)))


def two_spaces(rm: ResourceManager) -> tuple[RawClient, RawClient]:
    return RawClient(rm, rm.open_space()), RawClient(rm, rm.open_space())


def test_make_two_spaces(rm: ResourceManager) -> None:
    fd1, fd2 = two_spaces(rm)
    a = distinct_primary(fd1)
    b1 = distinct_primary(fd2)
    b2 = distinct_primary(fd2)
    # Each space numbers its own objects from the kernel's first slot.
    assert (a, b1, b2) == (0x80FFFFFF, 0x80FFFFFF, 0x80FFFFFE)
    # Same virtual handle, different objects: each space reaches its own.
    assert name_of(fd1, a) != name_of(fd2, b1)
    assert len({name_of(fd1, a), name_of(fd2, b1), name_of(fd2, b2)}) == 3
    # Between commands the TPM holds no object of either space.
    assert rm.tpm_census()["transient"] == []


def test_flush_context(client: RawClient) -> None:
    handle = client.create_primary()
    client.flush(handle)
    assert client.handles(TRANSIENT_FIRST) == (False, [])
    with pytest.raises(RMError) as info:
        client.read_public(handle)
    assert info.value.errno == errno.EINVAL
    assert_tpm_empty(client.rm)


def test_get_handles(rm: ResourceManager) -> None:
    fd1, fd2 = two_spaces(rm)
    distinct_primary(fd1)
    mine = [distinct_primary(fd2), distinct_primary(fd2)]
    # The kernel's order: slot order (0x80FFFFFF first), and `property` counts slots.
    assert mine == [0x80FFFFFF, 0x80FFFFFE]
    # The selftest's get_cap: count 1, property+1 while moreData: two commands.
    assert fd2.all_handles(TRANSIENT_FIRST) == mine
    assert fd2.handles(TRANSIENT_FIRST) == (False, mine)
    assert fd2.handles(TRANSIENT_FIRST, 1) == (True, mine[:1])
    assert fd2.handles(TRANSIENT_FIRST + 1, 1) == (False, mine[1:])
    assert fd2.handles(TRANSIENT_FIRST + 2) == (False, [])
    # A virtual handle as `property` is a slot far beyond the TPM's: nothing, as the kernel.
    assert fd2.handles(mine[1]) == (False, [])
    assert fd1.all_handles(TRANSIENT_FIRST) == [0x80FFFFFF]


def test_invalid_cc(client: RawClient) -> None:
    trips = client.rm.round_trips
    command = bytes.fromhex("80010000000a000001fe")  # cc 0x1FE: TPM2_CC_FIRST - 1
    assert client.send(command) == bytes.fromhex("80010000000a000b0143")
    assert client.rm.round_trips == trips  # never reached the TPM
    # The space is still usable.
    assert len(client.get_random(8)) == 8


def test_flush_invalid_context(client: RawClient) -> None:
    # The selftest writes in O_NONBLOCK mode: the write is accepted, the read gives EINVAL.
    future = client.rm.submit(client.space, build.flush_context(0x80123456))
    with pytest.raises(RMError) as info:
        future.result(timeout=10)
    assert info.value.errno == errno.EINVAL
    # Blocking: the same errno from the call itself.
    with pytest.raises(RMError) as info:
        client.send(build.flush_context(0x80123456))
    assert info.value.errno == errno.EINVAL
    assert len(client.get_random(8)) == 8


def test_virtual_handles_count_down_and_reuse_lowest_index(client: RawClient) -> None:
    handles = [client.create_primary() for _ in range(5)]
    assert handles == [0x80FFFFFF, 0x80FFFFFE, 0x80FFFFFD, 0x80FFFFFC, 0x80FFFFFB]
    client.flush(0x80FFFFFD)
    client.flush(0x80FFFFFF)
    client.flush(0x80FFFFFE)
    # Like the kernel's "first free slot": the lowest free index (highest handle) first,
    # whatever order the slots were freed in.
    assert client.create_primary() == 0x80FFFFFF
    assert client.create_primary() == 0x80FFFFFE
    assert client.create_primary() == 0x80FFFFFD
    assert client.create_primary() == 0x80FFFFFA
    assert client.handles(TRANSIENT_FIRST)[1] == [0x80FFFFFF - i for i in range(6)]


def test_reused_virtual_handle_is_the_new_object(client: RawClient) -> None:
    first = distinct_primary(client)
    old_name = name_of(client, first)
    client.flush(first)
    again = distinct_primary(client)
    assert again == first
    assert name_of(client, again) != old_name


def test_nothing_stays_loaded_between_commands(rm: ResourceManager) -> None:
    fd1, fd2 = two_spaces(rm)
    for _ in range(4):
        distinct_primary(fd1)
        distinct_primary(fd2)
    response = fd1.call(build.get_capability(TPM_CAP.TPM_PROPERTIES, TPM_PT.HR_TRANSIENT_AVAIL, 1))
    _, data = build.unmarshal_capability(response.parameters)
    assert [(p.property, p.value) for p in data.properties] == [(TPM_PT.HR_TRANSIENT_AVAIL, 3)]
    assert rm.tpm_census()["transient"] == []


def test_close_flushes_everything(rm: ResourceManager) -> None:
    fd1, fd2 = two_spaces(rm)
    distinct_primary(fd1)
    fd1.start_session()
    distinct_primary(fd2)
    fd2.start_session()
    rm.close_space(fd1.space)
    census = rm.tpm_census()
    assert len(census["saved_sessions"]) == 1  # fd2's session is still there
    assert rc_of(fd2.send(build.read_public(0x80FFFFFF))) == 0
    rm.close_space(fd2.space)
    assert_tpm_empty(rm)
    with pytest.raises(RMError) as info:
        fd1.send(build.get_random(8))
    assert info.value.errno == errno.EBADF
