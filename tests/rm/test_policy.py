"""Node policies through the RM: a refused command gets the RM-layer code and never reaches
the TPM; what the TPM holds is unchanged (checked from a `full` space of the same RM)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cusetpm.policy import NodePolicy, decide
from cusetpm.rm import ResourceManager, RMConfig, RMError
from cusetpm.tpm.command import parse_command
from cusetpm.tpm.constants import TPM_CC, TPM_RH
from cusetpm.tpm.rc import TPM_RC, rm_rc
from tests.rm.client import RawClient, pw_session, raw_command, rc_of
from tests.rm.conftest import RMFactory
from tests.rm.faults import FaultyBackend

REFUSED = 0x000B0120
SHA256 = 0x000B  # TPM_ALG_SHA256
assert rm_rc(TPM_RC.DISABLED) == REFUSED


def pcr_read(pcr: int) -> bytes:
    bitmap = (1 << pcr).to_bytes(3, "little")  # pcrSelect: PCR n is bit n%8 of byte n//8
    select = struct.pack(">IHB", 1, SHA256, 3) + bitmap
    return raw_command(TPM_CC.PCR_Read, [], select)


def pcr_extend(pcr: int) -> bytes:
    digests = struct.pack(">IH", 1, SHA256) + b"\x11" * 32
    return raw_command(TPM_CC.PCR_Extend, [pcr], digests, pw_session())


DENIED_ON_USER = {
    "tpm2_clear": raw_command(TPM_CC.Clear, [TPM_RH.LOCKOUT], b"", pw_session()),
    "tpm2_evictcontrol": raw_command(
        TPM_CC.EvictControl, [TPM_RH.OWNER, 0x80000000], struct.pack(">I", 0x81000001),
        pw_session()),
    "tpm2_nvdefine": raw_command(
        TPM_CC.NV_DefineSpace, [TPM_RH.OWNER],
        struct.pack(">H", 0) + struct.pack(">HIHIHH", 14, 0x01800001, SHA256, 0x60006,
                                           0, 8), pw_session()),
    "tpm2_changeauth -c owner": raw_command(
        TPM_CC.HierarchyChangeAuth, [TPM_RH.OWNER], struct.pack(">H", 2) + b"pw", pw_session()),
    "tpm2_dictionarylockout --clear-lockout": raw_command(
        TPM_CC.DictionaryAttackLockReset, [TPM_RH.LOCKOUT], b"", pw_session()),
    "tpm2_pcrextend 0": pcr_extend(0),
    "PolicySecret with lockout": raw_command(
        TPM_CC.PolicySecret, [TPM_RH.LOCKOUT, 0x03000000], b"\0" * 14, pw_session()),
    "tpm2_setclock": raw_command(TPM_CC.ClockSet, [TPM_RH.OWNER], struct.pack(">Q", 1 << 40),
                                 pw_session()),
}


@pytest.fixture
def nodes(make_rm: RMFactory) -> tuple[ResourceManager, FaultyBackend, RawClient, RawClient]:
    rm = make_rm(wrap=FaultyBackend)
    backend = rm.backend
    assert isinstance(backend, FaultyBackend)
    user = RawClient(rm, rm.open_space(uid=1000, pid=4242, node="tpmrm-user",
                                       policy=NodePolicy.from_profile("user")))
    full = RawClient(rm, rm.open_space(node="tpmrm0", policy=NodePolicy.from_profile("full")))
    return rm, backend, user, full


@pytest.mark.parametrize("what", sorted(DENIED_ON_USER))
def test_refused_on_user_never_reaches_the_tpm(nodes, what: str, caplog) -> None:
    rm, backend, user, full = nodes
    pcr0_before = full.send(pcr_read(0))
    sent_before = len(backend.log)
    command = DENIED_ON_USER[what]
    for _ in range(3):
        assert rc_of(user.send(command)) == REFUSED, what
    assert len(backend.log) == sent_before  # nothing of the three reached the TPM
    assert full.send(pcr_read(0)) == pcr0_before
    logged = [r for r in caplog.records if "refused" in r.getMessage()
              and "tpmrm-user" in r.getMessage()]
    assert len(logged) == 1, "logged once per space and command code"
    assert "pid 4242 uid 1000" in logged[0].getMessage()
    assert sum(rm._executor.policy_refusals.values()) == 3


def test_allowed_on_user_and_full(nodes) -> None:
    rm, _, user, full = nodes
    user.create_primary(hierarchy=TPM_RH.OWNER)
    before = user.send(pcr_read(16))
    assert rc_of(user.send(pcr_extend(16))) == 0
    assert user.send(pcr_read(16)) != before
    pcr0 = full.send(pcr_read(0))
    assert rc_of(full.send(pcr_extend(0))) == 0  # full: the same command reaches the TPM
    assert full.send(pcr_read(0)) != pcr0
    assert not rm._executor.policy_refusals


def test_sessions_per_uid_across_nodes(make_rm: RMFactory) -> None:
    """A uid's sessions count over its spaces on every node; root is not limited."""
    rm = make_rm(config=RMConfig(max_sessions_per_uid=2))
    user_policy = NodePolicy.from_profile("user")
    a = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-user", policy=user_policy))
    b = RawClient(rm, rm.open_space(uid=1000, node="tpmrm-attest",
                                    policy=NodePolicy.from_profile("attest")))
    root = RawClient(rm, rm.open_space(uid=0, node="tpmrm0"))
    a.start_session()
    b.start_session()
    over = a.send(start_session_command())
    assert rc_of(over) == 0x000B0903
    for _ in range(3):
        root.start_session()
    rm.close_space(b.space)
    a.start_session()  # b's session went with its descriptor


def start_session_command() -> bytes:
    nonce = struct.pack(">H", 16) + b"\x01" * 16
    # no salt; sessionType HMAC, symmetric TPM_ALG_NULL, authHash SHA-256
    params = nonce + b"\0\0" + struct.pack(">BHH", 0x00, 0x0010, SHA256)
    return raw_command(TPM_CC.StartAuthSession, [TPM_RH.NULL, TPM_RH.NULL], params)


DENIED_SEEN: set[int] = set()  # the fuzz pass must exercise denials, checked below
HANDLE_CHOICES = [TPM_RH.OWNER, TPM_RH.LOCKOUT, TPM_RH.PLATFORM, TPM_RH.ENDORSEMENT,
                  TPM_RH.NULL, 0, 7, 16, 23, 0x01800001, 0x01C00002, 0x81000001, 0x80000000]


@settings(derandomize=True, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_user_node_backend_never_sees_a_denied_command(nodes, data) -> None:  # type: ignore[no-untyped-def]
    """Random commands (every code, hierarchy/PCR/NV/persistent handles, random parameters)
    on a `user` space: whatever the policy denies is answered 0x000B0120 and is not sent."""
    rm, backend, user, _full = nodes
    code = data.draw(st.sampled_from(sorted(TPM_CC)))
    attrs = rm._executor.table.lookup(code)
    # mostly the TPM's own handle count, so that the policy sees what the RM parses
    count = attrs.cHandles if attrs is not None and data.draw(st.integers(0, 4)) else None
    handles = data.draw(st.lists(st.sampled_from(HANDLE_CHOICES), min_size=count or 0,
                                 max_size=count if count is not None else 3))
    params = data.draw(st.binary(max_size=24))
    with_session = data.draw(st.booleans())
    command = raw_command(code, handles, params, pw_session() if with_session else None)
    before = len(backend.log)
    try:
        response = user.send(command)
    except RMError:  # malformed: refused (EINVAL) before the policy, never sent either
        assert code not in [s.code for s in backend.log[before:]]
        return
    sent = [s.code for s in backend.log[before:]]
    if rc_of(response) == REFUSED:
        assert code not in sent
    policy = user.space.policy
    assert policy is not None
    if attrs is None or len(handles) != attrs.cHandles:
        return  # the RM refuses it before the policy (unknown code, or unparseable)
    denied = not decide(policy, parse_command(command, attrs.cHandles)).allowed
    if denied:
        assert rc_of(response) == REFUSED, TPM_CC(code).name
        assert code not in sent, TPM_CC(code).name
        DENIED_SEEN.add(code)



def test_fuzz_pass_exercised_denials() -> None:
    """Runs after the fuzz pass in file order: it met many denied codes (derandomized)."""
    assert len(DENIED_SEEN) >= 20, sorted(DENIED_SEEN)


# -- the authorization area: a session authorizing a refused hierarchy -----------------------

NV_INDEX = 0x01800010
TPMA_NV_OWNER_AUTH_RW = 0x00060006  # OWNERWRITE|AUTHWRITE|OWNERREAD|AUTHREAD
FW_PLATFORM = 0x40000142  # TPM_RH_FW_PLATFORM (Part 2, 1.83): the firmware-limited platform


def nv_define(index: int) -> bytes:
    public = struct.pack(">IHIHH", index, SHA256, TPMA_NV_OWNER_AUTH_RW, 0, 8)
    params = struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
    return raw_command(TPM_CC.NV_DefineSpace, [TPM_RH.OWNER], params, pw_session())


def nv_write(auth: int, index: int, data: bytes) -> bytes:
    params = struct.pack(">H", len(data)) + data + struct.pack(">H", 0)
    return raw_command(TPM_CC.NV_Write, [auth, index], params, pw_session())


def nv_read(auth: int, index: int, sessions: list | None = None) -> bytes:
    return raw_command(TPM_CC.NV_Read, [auth, index], struct.pack(">HH", 8, 0),
                       sessions or pw_session())


def session_auth(handle: int) -> list:
    from tpm2_pytss.constants import TPMA_SESSION

    from cusetpm.tpm.command import AuthCommand
    return [AuthCommand(handle, b"", int(TPMA_SESSION.CONTINUESESSION), b"")]


def bind_to(hierarchy: int) -> bytes:
    nonce = struct.pack(">H", 16) + b"\x02" * 16
    params = nonce + b"\0\0" + struct.pack(">BHH", 0x00, 0x0010, SHA256)
    return raw_command(TPM_CC.StartAuthSession, [TPM_RH.NULL, hierarchy], params)


@pytest.fixture
def nv_nodes(nodes):  # type: ignore[no-untyped-def]
    """`nodes`, with an owner NV index defined and written through the full space."""
    rm, backend, user, full = nodes
    assert rc_of(full.send(nv_define(NV_INDEX))) == 0
    assert rc_of(full.send(nv_write(TPM_RH.OWNER, NV_INDEX, b"12345678"))) == 0
    return rm, backend, user, full


def test_auth_area_authorizing_a_refused_hierarchy_never_reaches_the_tpm(nv_nodes) -> None:
    """Commands the user profile allows (NV_Read, NV_Write, PolicySecret, StartAuthSession,
    CreatePrimary), with a session authorizing platform or lockout: refused, nothing sent;
    the same commands authorized by owner reach the TPM."""
    rm, backend, user, full = nv_nodes
    policy_session = user.start_session(session_type=0x01)  # TPM_SE_POLICY
    refused = {
        "NV_Read, password session authorizing platform": nv_read(TPM_RH.PLATFORM, NV_INDEX),
        "NV_Read, policy session authorizing lockout": nv_read(
            TPM_RH.LOCKOUT, NV_INDEX, session_auth(policy_session)),
        "NV_Write, password session authorizing platform": nv_write(
            TPM_RH.PLATFORM, NV_INDEX, b"87654321"),
        "PolicySecret authorizing platform": raw_command(
            TPM_CC.PolicySecret, [TPM_RH.PLATFORM, policy_session], b"\0" * 14, pw_session()),
        "StartAuthSession bound to lockout": bind_to(TPM_RH.LOCKOUT),
        "CreatePrimary under the firmware-limited platform hierarchy": raw_command(
            TPM_CC.CreatePrimary, [FW_PLATFORM], b"\0" * 12, pw_session()),
    }
    for what, command in refused.items():
        sent_before = len(backend.log)
        assert rc_of(user.send(command)) == REFUSED, what
        assert len(backend.log) == sent_before, f"{what} reached the TPM"
    reasons = " | ".join(reason for (node, reason) in rm._executor.policy_refusals)
    assert "session 1 (password session) authorizes hierarchy platform" in reasons
    assert "session 1 (policy session) authorizes hierarchy lockout" in reasons
    assert "handle 2 names hierarchy lockout" in reasons  # StartAuthSession's bind
    # the index is unchanged, and the user's policy session still works
    read = full.send(nv_read(TPM_RH.OWNER, NV_INDEX))
    assert rc_of(read) == 0 and b"\x00\x0812345678" in read
    get_digest = raw_command(TPM_CC.PolicyGetDigest, [policy_session])
    assert rc_of(user.send(get_digest)) == 0
    # authorized by owner, the same commands are the TPM's business
    sent_before = len(backend.log)
    assert rc_of(user.send(nv_read(TPM_RH.OWNER, NV_INDEX))) == 0
    assert len(backend.log) > sent_before
    assert rc_of(user.send(bind_to(TPM_RH.OWNER))) == 0


def test_full_node_sends_the_same_commands(nv_nodes) -> None:
    """Platform authorization is not refused by a full node: the TPM answers (libtpms:
    the platform may not read an index without TPMA_NV_PPREAD)."""
    rm, backend, _user, full = nv_nodes
    sent_before = len(backend.log)
    response = full.send(nv_read(TPM_RH.PLATFORM, NV_INDEX))
    assert rc_of(response) not in (0, REFUSED)
    assert TPM_CC.NV_Read in [s.code for s in backend.log[sent_before:]]
    assert not rm._executor.policy_refusals
