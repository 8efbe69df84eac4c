"""Limits per space, per uid and in total: refused before anything runs, one space's limits
never touch another's."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from cusetpm.rm import ResourceManager, RMConfig, RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_SE
from tests.rm.client import (
    EMPTY_SENSITIVE,
    NO_OUTSIDE_INFO_NO_PCRS,
    RawClient,
    create_child,
    ecc_signing_template,
    ecc_storage_template,
    hash_sequence_start,
    load_child,
    pw_session,
    raw_command,
    rc_of,
    tpm2b_of,
)
from tests.rm.conftest import RMFactory, assert_tpm_empty

OBJECT_MEMORY = bytes.fromhex("80010000000a000b0902")
SESSION_MEMORY = bytes.fromhex("80010000000a000b0903")


def assert_refused_before_running(client: RawClient, command: bytes, response: bytes) -> None:
    rm = client.rm
    census = rm.tpm_census()
    trips = rm.round_trips
    assert client.send(command) == response
    assert rm.round_trips == trips  # the TPM never saw it
    assert rm.tpm_census() == census


def test_defaults() -> None:
    config = RMConfig()
    assert (config.max_objects, config.max_sessions, config.max_spaces) == (64, 16, 1024)


def test_objects_per_space(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_objects=4))
    a = RawClient(rm, rm.open_space())
    parent = a.create_primary()
    private, public = create_child(a, parent, ecc_signing_template())
    child = load_child(a, parent, private, public)
    blob = a.context_save(child)
    hash_sequence_start(a)
    a.create_primary()
    assert len(a.handles(0x80000000)[1]) == 4
    create_primary = create_primary_command()
    load = raw_command(TPM_CC.Load, [parent], private + public, pw_session())
    sequence = raw_command(TPM_CC.HashSequenceStart, [], tpm2b_of(b"") + b"\x00\x0b")
    for command in (create_primary, load, build.context_load_raw(blob), sequence):
        assert_refused_before_running(a, command, OBJECT_MEMORY)
    # the space still works; a freed slot can be used again
    assert len(a.get_random(8)) == 8
    a.flush(child)
    assert load_child(a, parent, private, public) == child
    assert_refused_before_running(a, load, OBJECT_MEMORY)
    # another space has its own quota
    b = RawClient(rm, rm.open_space())
    for _ in range(4):
        b.create_primary()
    assert_refused_before_running(b, create_primary, OBJECT_MEMORY)
    rm.close_space(a.space)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def test_sessions_per_space(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_sessions=3))
    a = RawClient(rm, rm.open_space())
    first = a.start_session()
    a.start_session(TPM_SE.POLICY)
    a.start_session()
    assert_refused_before_running(a, start_session_command(), SESSION_MEMORY)
    assert_refused_before_running(a, start_session_command(TPM_SE.POLICY), SESSION_MEMORY)
    # objects are not sessions
    a.create_primary()
    # another space is not affected
    b = RawClient(rm, rm.open_space())
    for _ in range(3):
        b.start_session()
    assert_refused_before_running(b, start_session_command(), SESSION_MEMORY)
    # ending one frees a place, for this space only
    a.flush(first)
    assert_refused_before_running(b, start_session_command(), SESSION_MEMORY)
    a.start_session()
    assert_refused_before_running(a, start_session_command(), SESSION_MEMORY)
    rm.close_space(a.space)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def start_session_command(kind: int = TPM_SE.HMAC) -> bytes:
    params = tpm2b_of(os.urandom(16)) + b"\0\0" + struct.pack(">BHH", kind, 0x10, 0x0B)
    return raw_command(TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], params)


def test_spaces_in_total(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_spaces=5))
    spaces = [rm.open_space(uid=i) for i in range(5)]
    with pytest.raises(RMError) as info:
        rm.open_space()
    assert info.value.errno == errno.ENFILE
    assert rm.open_spaces == 5
    rm.close_space(spaces[2])
    again = rm.open_space()
    assert rc_of(rm.transmit(again, start_session_command())) == 0
    with pytest.raises(RMError) as info:
        rm.open_space(uid=99)
    assert info.value.errno == errno.ENFILE
    for space in [*spaces[:2], *spaces[3:], again]:
        rm.close_space(space)
    assert rm.open_spaces == 0
    assert_tpm_empty(rm)


def test_spaces_per_uid(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_spaces_per_uid=2))
    mine = [rm.open_space(uid=1000), rm.open_space(uid=1000)]
    with pytest.raises(RMError) as info:
        rm.open_space(uid=1000)
    assert info.value.errno == errno.EMFILE
    others = [rm.open_space(uid=1001), rm.open_space(uid=0), rm.open_space(uid=0)]
    with pytest.raises(RMError) as info:
        rm.open_space(uid=0)
    assert info.value.errno == errno.EMFILE
    rm.close_space(mine[0])
    mine[0] = rm.open_space(uid=1000)
    for space in mine + others:
        rm.close_space(space)
    assert rm.open_spaces == 0


def test_default_limits_hold(rm: ResourceManager) -> None:
    a = RawClient(rm, rm.open_space())
    for _ in range(64):
        a.create_primary()
    assert_refused_before_running(a, create_primary_command(), OBJECT_MEMORY)
    for _ in range(16):
        a.start_session()
    assert_refused_before_running(a, start_session_command(), SESSION_MEMORY)
    b = RawClient(rm, rm.open_space())
    b.create_primary()
    b.start_session()
    rm.close_space(a.space)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def create_primary_command() -> bytes:
    params = EMPTY_SENSITIVE + ecc_storage_template() + NO_OUTSIDE_INFO_NO_PCRS
    return raw_command(TPM_CC.CreatePrimary, [TPM_RH.OWNER], params, pw_session())
