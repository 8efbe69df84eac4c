"""Quotas per uid over every node and per node (rm/quotas.py), through the RM over libtpms:
a command over a quota gets the RM-layer code and never reaches the TPM."""

from __future__ import annotations

import errno

import pytest

from cusetpm.rm import ResourceManager, RMConfig, RMError
from cusetpm.rm.quotas import NodeLimits
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_RH
from tests.rm.client import (
    EMPTY_SENSITIVE,
    NO_OUTSIDE_INFO_NO_PCRS,
    RawClient,
    ecc_storage_template,
    pw_session,
    raw_command,
    rc_of,
)
from tests.rm.conftest import RMFactory
from tests.rm.faults import FaultyBackend
from tests.rm.test_policy import start_session_command

OVER_OBJECTS, OVER_SESSIONS = 0x000B0902, 0x000B0903


def create_primary_command() -> bytes:
    params = EMPTY_SENSITIVE + ecc_storage_template() + NO_OUTSIDE_INFO_NO_PCRS
    return raw_command(TPM_CC.CreatePrimary, [TPM_RH.OWNER], params, pw_session())


def refused_unsent(rm: ResourceManager, client: RawClient, command: bytes, rc: int) -> None:
    backend = rm.backend
    assert isinstance(backend, FaultyBackend)
    before = len(backend.log)
    assert rc_of(client.send(command)) == rc
    assert len(backend.log) == before, "a command over a quota reached the TPM"


def test_objects_per_uid_over_every_node(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_objects_per_uid=3), wrap=FaultyBackend)
    a = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    b = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-attest"))
    other = RawClient(rm, rm.open_space(uid=1001, node="tpmrm-user"))
    root = RawClient(rm, rm.open_space(uid=0, node="tpmrm0"))
    first = a.create_primary()
    a.create_primary()
    b.create_primary()
    refused_unsent(rm, b, create_primary_command(), OVER_OBJECTS)
    refused_unsent(rm, a, create_primary_command(), OVER_OBJECTS)
    for _ in range(3):
        other.create_primary()  # another uid has its own quota
    for _ in range(5):
        root.create_primary()  # root is exempt from the per-uid quotas
    a.flush(first)
    b.create_primary()  # a flushed object gives its place back


def test_node_sessions_total_and_per_uid(make_rm: RMFactory) -> None:
    rm = make_rm(wrap=FaultyBackend)
    rm.set_node_limits("tpmrm-user", NodeLimits(sessions=3, sessions_per_uid=2))
    u1 = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    u1b = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    u2 = RawClient(rm, rm.open_space(uid=1001, node="tpmrm-user"))
    u3 = RawClient(rm, rm.open_space(uid=1002, node="tpmrm-user"))
    elsewhere = RawClient(rm, rm.open_space(uid=1000, node="tpmrm0"))
    root_on_user = RawClient(rm, rm.open_space(uid=0, node="tpmrm-user"))
    u1.start_session()
    u1b.start_session()
    refused_unsent(rm, u1, start_session_command(), OVER_SESSIONS)  # per uid on the node
    u2.start_session()
    refused_unsent(rm, u3, start_session_command(), OVER_SESSIONS)  # the node's total
    refused_unsent(rm, root_on_user, start_session_command(), OVER_SESSIONS)  # root too
    for _ in range(4):
        elsewhere.start_session()  # the same uid on another node is not the node's business
    rm.close_space(u1b.space)
    u3.start_session()


def test_node_objects(make_rm: RMFactory) -> None:
    rm = make_rm(wrap=FaultyBackend)
    rm.set_node_limits("tpmrm-user", NodeLimits(objects_per_uid=1, objects=2))
    a = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    b = RawClient(rm, rm.open_space(uid=1001, node="tpmrm-user"))
    c = RawClient(rm, rm.open_space(uid=1002, node="tpmrm-user"))
    a.create_primary()
    refused_unsent(rm, a, create_primary_command(), OVER_OBJECTS)
    b.create_primary()
    refused_unsent(rm, c, create_primary_command(), OVER_OBJECTS)
    # a ContextLoad of an object creates one too
    blob = a.context_save(next(iter(a.space.objects)))
    refused_unsent(rm, a, build.context_load_raw(blob), OVER_OBJECTS)


def test_node_spaces(make_rm: RMFactory) -> None:
    rm = make_rm()
    rm.set_node_limits("tpmrm-user", NodeLimits(spaces=3, spaces_per_uid=2))
    mine = [rm.open_space(uid=1000, node="tpmrm-user") for _ in range(2)]
    with pytest.raises(RMError) as err:
        rm.open_space(uid=1000, node="tpmrm-user")
    assert err.value.errno == errno.EMFILE
    rm.open_space(uid=1000, node="tpmrm0")  # another node
    rm.open_space(uid=1001, node="tpmrm-user")
    with pytest.raises(RMError) as err:
        rm.open_space(uid=1002, node="tpmrm-user")
    assert err.value.errno == errno.ENFILE
    rm.close_space(mine[0]).result()
    rm.open_space(uid=1002, node="tpmrm-user")


def test_new_limits_keep_what_is_held(make_rm: RMFactory) -> None:
    """SIGHUP's set_node_limits: lower limits refuse new sessions, never take any away."""
    rm = make_rm()
    a = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    held = [a.start_session() for _ in range(3)]
    rm.set_node_limits("tpmrm-user", NodeLimits(sessions_per_uid=2))
    assert rc_of(a.send(start_session_command())) == OVER_SESSIONS
    assert sorted(a.space.sessions) == sorted(held)
    rm.set_node_limits("tpmrm-user", None)
    a.start_session()


def test_a_token_is_claimed_only_on_its_node_and_within_the_quotas(make_rm: RMFactory) -> None:
    """Continuation tokens neither carry a session to another node (whose policy may be
    narrower) nor let a uid hold more sessions than its quota."""
    from tests.rm.continuation_helpers import RC_STALE, claim_rc

    rm = make_rm()
    rm.set_node_limits("tpmrm-user", NodeLimits(sessions_per_uid=1))
    full = RawClient(rm, rm.open_space(uid=1000, node="tpmrm0"))
    user = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    user_b = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    token_full = full.context_save(full.start_session())
    assert claim_rc(user, token_full) == RC_STALE  # saved on tpmrm0: not claimable here
    assert claim_rc(full, token_full) == 0  # where it was saved, it still is
    token_user = user.context_save(user.start_session())
    rm.close_space(user.space)  # abandoned: counted against nobody until claimed
    user_b.start_session()  # uid 1000's one session on the node
    assert claim_rc(user_b, token_user) == OVER_SESSIONS
    rm.close_space(user_b.space)
    other = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user"))
    assert claim_rc(other, token_user) == 0
