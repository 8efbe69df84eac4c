"""Isolation between spaces: space B can never name, use, flush, save or list what space A owns.

No refusal reaches the TPM, and A's objects and sessions work after. Another space's
transient handle is RMError EINVAL (as the kernel); another space's session is answered as
the TPM answers a session that is not there (the kernel passes session handles through), so
it reads exactly like an absent one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from dataclasses import dataclass

import pytest
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
)

from cusetpm.rm import ResourceManager, RMError
from cusetpm.tpm import commands as build
from cusetpm.tpm.command import AuthCommand
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_SE
from cusetpm.tpm.rc import TPM_RC
from tests.rm.client import (
    CONTINUE,
    EMPTY_SENSITIVE,
    NO_OUTSIDE_INFO_NO_PCRS,
    RawClient,
    assert_answered_as_absent,
    ecc_signing_template,
    ecc_storage_template,
    esapi,
    name_of,
    policy_restart,
    pw_session,
    raw_command,
    rc_of,
    tpm2b_of,
    with_unique,
)
from tests.rm.conftest import assert_tpm_empty

SIGN_ATTRS = (
    TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


@dataclass
class SpaceA:
    """Space A, driven through ESAPI: a primary, a signing key and three sessions."""

    esys: ESAPI
    raw: RawClient
    primary: int
    key: int
    key_tr: object
    hmac: int
    hmac_tr: object
    policy: int
    policy_tr: object
    audit: int
    audit_tr: object
    names: dict[int, bytes]

    def check_still_works(self) -> None:
        for handle, name in self.names.items():
            assert name_of(self.raw, handle) == name
        digest = hashlib.sha256(b"A still signs").digest()
        # the HMAC session authorizes the key; ESAPI checks the response HMAC
        signature = self.esys.sign(
            self.key_tr,
            digest,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
            NULL_TICKET,
            session1=self.hmac_tr,
        )
        assert signature.sigAlg == TPM2_ALG.ECDSA
        self.esys.policy_restart(self.policy_tr)
        self.esys.policy_pcr(self.policy_tr, b"", "sha256:16")
        assert self.esys.get_random(8, session1=self.audit_tr)
        assert set(self.raw.handles(0x02000000)[1]) == {self.hmac, self.policy, self.audit}


def make_space_a(rm: ResourceManager) -> SpaceA:
    space = rm.open_space()
    esys = esapi(rm, space)
    raw = RawClient(rm, space)
    primary = raw.create_primary(with_unique(ecc_storage_template(), os.urandom(32)))
    primary_tr = esys.tr_from_tpmpublic(primary)
    private, public, *_ = esys.create(
        primary_tr, None, TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=SIGN_ATTRS)
    )
    key_tr = esys.load(primary_tr, private, public)
    key = esys.tr_get_tpm_handle(key_tr)
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)
    hmac_tr = esys.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, sym, TPM2_ALG.SHA256
    )
    esys.trsess_set_attributes(hmac_tr, CONTINUE)
    policy_tr = esys.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, sym, TPM2_ALG.SHA256
    )
    audit_tr = esys.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, sym, TPM2_ALG.SHA256
    )
    esys.trsess_set_attributes(audit_tr, CONTINUE | TPMA_SESSION.AUDIT)
    a = SpaceA(
        esys=esys,
        raw=raw,
        primary=primary,
        key=key,
        key_tr=key_tr,
        hmac=esys.tr_get_tpm_handle(hmac_tr),
        hmac_tr=hmac_tr,
        policy=esys.tr_get_tpm_handle(policy_tr),
        policy_tr=policy_tr,
        audit=esys.tr_get_tpm_handle(audit_tr),
        audit_tr=audit_tr,
        names={},
    )
    a.names = {primary: name_of(raw, primary), key: name_of(raw, key)}
    assert primary == 0x80FFFFFF and key == 0x80FFFFFE
    a.check_still_works()
    return a


@pytest.fixture
def a(rm: ResourceManager) -> SpaceA:
    return make_space_a(rm)


@pytest.fixture
def b(rm: ResourceManager) -> RawClient:
    """Space B with one object of its own (so it holds 0x80FFFFFF, but not 0x80FFFFFE)."""
    client = RawClient(rm, rm.open_space())
    client.create_primary(with_unique(ecc_storage_template(), os.urandom(32)))
    return client


def assert_refused(client: RawClient, command: bytes, what: str = "") -> None:
    """EINVAL, and the TPM never saw the command."""
    trips = client.rm.round_trips
    with pytest.raises(RMError) as info:
        client.send(command)
    assert info.value.errno == errno.EINVAL, (what, info.value)
    assert client.rm.round_trips == trips, what


def sign_command(key: int) -> bytes:
    params = (
        tpm2b_of(hashlib.sha256(b"x").digest())
        + struct.pack(">HH", 0x0018, 0x000B)  # ECDSA, SHA-256
        + struct.pack(">HIH", 0x8024, TPM_RH.NULL, 0)  # TPMT_TK_HASHCHECK, null ticket
    )
    return raw_command(TPM_CC.Sign, [key], params, pw_session())


def create_command(parent: int) -> bytes:
    params = EMPTY_SENSITIVE + ecc_signing_template() + NO_OUTSIDE_INFO_NO_PCRS
    return raw_command(TPM_CC.Create, [parent], params, pw_session())


def start_session_command(tpm_key: int, bind: int) -> bytes:
    params = tpm2b_of(os.urandom(16)) + b"\0\0" + struct.pack(">BHH", TPM_SE.HMAC, 0x10, 0x0B)
    return raw_command(TPM_CC.StartAuthSession, [tpm_key, bind], params)


def foreign_object_commands(handle: int, own: int) -> dict[str, bytes]:
    return {
        "ReadPublic": build.read_public(handle),
        "Create under it": create_command(handle),
        "Load under it": raw_command(
            TPM_CC.Load, [handle], b"\0\0" + ecc_signing_template(), pw_session()
        ),
        "Sign": sign_command(handle),
        "FlushContext": build.flush_context(handle),
        "ContextSave": build.context_save(handle),
        "StartAuthSession tpmKey": start_session_command(handle, TPM_RH.NULL),
        "StartAuthSession bind": start_session_command(TPM_RH.NULL, handle),
        "Certify, own object as the other handle": raw_command(
            TPM_CC.Certify, [own, handle], b"\0\0" + struct.pack(">H", 0x10), pw_session() * 2
        ),
    }


def test_b_cannot_touch_a_objects(a: SpaceA, b: RawClient) -> None:
    own = 0x80FFFFFF
    for what, command in foreign_object_commands(a.key, own).items():
        assert_refused(b, command, what)
    a.check_still_works()


def test_b_cannot_guess_physical_or_unused_transient_handles(a: SpaceA, b: RawClient) -> None:
    guesses = [0x80000000, 0x80000001, 0x80000002, 0x80000003, 0x80FFFFFE, 0x80FFFFFD, 0x80FFFF00]
    for handle in guesses:
        for command in foreign_object_commands(handle, 0x80FFFFFF).values():
            assert_refused(b, command)
    a.check_still_works()


def test_same_virtual_handle_is_each_space_own_object(a: SpaceA, b: RawClient) -> None:
    assert name_of(b, 0x80FFFFFF) != a.names[0x80FFFFFF]
    assert name_of(a.raw, 0x80FFFFFF) == a.names[0x80FFFFFF]


def test_b_lists_only_its_own(a: SpaceA, b: RawClient) -> None:
    b.start_session()
    assert b.handles(0x80000000) == (False, [0x80FFFFFF])
    _, sessions = b.handles(0x02000000)
    assert len(sessions) == 1
    assert not {a.hmac, a.policy, a.audit} & set(sessions)
    assert b.handles(0x03000000)[1] == []
    assert a.raw.handles(0x80000000) == (False, [0x80FFFFFF, 0x80FFFFFE])


def session_commands(session: int) -> dict[str, bytes]:
    pcr16 = struct.pack(">IHB3s", 1, 0x000B, 3, b"\x00\x00\x01")
    hmac_auth = [AuthCommand(session, os.urandom(16), 0x01, os.urandom(32))]
    return {
        "PolicyRestart": raw_command(TPM_CC.PolicyRestart, [session]),
        "PolicyPCR": raw_command(TPM_CC.PolicyPCR, [session], b"\0\0" + pcr16),
        "PolicyGetDigest": raw_command(TPM_CC.PolicyGetDigest, [session]),
        "FlushContext": build.flush_context(session),
        "ContextSave": build.context_save(session),
        "in the auth area of CreatePrimary": raw_command(
            TPM_CC.CreatePrimary,
            [TPM_RH.OWNER],
            EMPTY_SENSITIVE + ecc_storage_template() + NO_OUTSIDE_INFO_NO_PCRS,
            hmac_auth,
        ),
        "as an audit session of GetRandom": raw_command(
            TPM_CC.GetRandom,
            [],
            struct.pack(">H", 8),
            [AuthCommand(session, os.urandom(16), 0x81, os.urandom(32))],
        ),
        "as the second session": raw_command(
            TPM_CC.ReadPublic,
            [0x80FFFFFF],
            b"",
            [AuthCommand(session, os.urandom(16), 0x41, os.urandom(32))],
        ),
    }


def answered_without_tpm(client: RawClient, command: bytes) -> int:
    trips = client.rm.round_trips
    response = client.send(command)
    assert client.rm.round_trips == trips, "a command naming a foreign session reached the TPM"
    assert len(response) == 10
    return rc_of(response)


# Sent to the TPM as it is, this one would stop at B's virtual object handle: the expected
# code is the auth-area position's TPM_RC_REFERENCE_S<n>, which the other cases take from
# libtpms itself.
NAMES_AN_OBJECT = {"as the second session": TPM_RC.REFERENCE_S0}


def test_b_cannot_use_a_sessions(a: SpaceA, b: RawClient) -> None:
    for session in (a.hmac, a.policy, a.audit):
        for what, command in session_commands(session).items():
            if what in NAMES_AN_OBJECT:
                assert answered_without_tpm(b, command) == NAMES_AN_OBJECT[what], what
            else:
                assert_answered_as_absent(b, command, session)
    # also after a password session, in second place of the auth area
    mixed = raw_command(
        TPM_CC.Sign,
        [0x80FFFFFF],
        sign_command(0)[-(32 + 2 + 4 + 8) :],
        [*pw_session(), AuthCommand(a.audit, os.urandom(16), 0x81, os.urandom(32))],
    )
    assert answered_without_tpm(b, mixed) == TPM_RC.REFERENCE_S1
    a.check_still_works()


def test_b_cannot_guess_session_handles(a: SpaceA, b: RawClient) -> None:
    own = b.start_session(TPM_SE.POLICY)
    guesses = [
        kind | index
        for kind in (0x02000000, 0x03000000)
        for index in range(64)
        if (kind | index) & 0x00FFFFFF != own & 0x00FFFFFF
    ]
    assert a.policy in guesses and a.hmac in guesses
    answers = set()
    for handle in guesses:
        restart = raw_command(TPM_CC.PolicyRestart, [handle])
        answers.add(assert_answered_as_absent(b, restart, handle))
        answers.add(assert_answered_as_absent(b, build.flush_context(handle), handle))
    # A's sessions read like never-used numbers: only the TPM's codes for absent sessions
    assert answers <= {0x184, TPM_RC.REFERENCE_H0, TPM_RC.HANDLE | 0x140}, answers
    assert policy_restart(b, own)[6:10] == b"\0\0\0\0"
    a.check_still_works()


def test_b_listing_with_a_session_shows_nothing_of_a(a: SpaceA, rm: ResourceManager) -> None:
    """GetCapability(HANDLES) carrying an audit session is not answered by the RM's own list
    code path; it still must not show A's sessions (nor hide B's objects)."""
    space = rm.open_space()
    b_esys = esapi(rm, space)
    b_raw = RawClient(rm, space)
    b_raw.create_primary()
    audit = b_esys.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.HMAC,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    b_esys.trsess_set_attributes(audit, CONTINUE | TPMA_SESSION.AUDIT)
    own_session = b_esys.tr_get_tpm_handle(audit)
    seen: set[int] = set()
    for first in (0x02000000, 0x03000000):
        try:
            _, data = b_esys.get_capability(TPM2_CAP.HANDLES, first, 254, session1=audit)
        except TSS2_Exception:  # refusing is acceptable; leaking is not
            error = b_esys.tcti.last_error
            assert error is not None and error.errno == errno.EINVAL
            continue
        seen |= set(data.data.handles)
    # The TPM lists saved sessions by index (as 0x02xxxxxx, whatever their type): compare indices.
    index = 0x00FFFFFF
    a_indices = {h & index for h in (a.hmac, a.policy, a.audit)}
    assert not {h & index for h in seen} & a_indices, [hex(h) for h in seen]
    assert {h & index for h in seen} <= {own_session & index}
    a.check_still_works()


def test_refused_commands_leave_a_intact_after_b_closes(a: SpaceA, rm: ResourceManager) -> None:
    b = RawClient(rm, rm.open_space())
    for session in (a.hmac, a.policy):
        assert_answered_as_absent(b, build.flush_context(session), session)
    assert_refused(b, build.flush_context(a.key))
    rm.close_space(b.space)
    a.check_still_works()
    rm.close_space(a.raw.space)
    assert_tpm_empty(rm)


def test_listing_with_a_session_is_refused_not_wrong(rm: ResourceManager) -> None:
    """The TPM holds none of the space's objects between commands, so its own answer would be
    an empty list; the RM cannot rewrite an audited response, so it refuses instead."""
    space = rm.open_space()
    esys = esapi(rm, space)
    raw = RawClient(rm, space)
    own = raw.create_primary()
    audit = esys.start_auth_session(
        ESYS_TR.NONE,
        ESYS_TR.NONE,
        TPM2_SE.HMAC,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
        TPM2_ALG.SHA256,
    )
    esys.trsess_set_attributes(audit, CONTINUE | TPMA_SESSION.AUDIT)
    with pytest.raises(TSS2_Exception):
        esys.get_capability(TPM2_CAP.HANDLES, 0x80000000, 254, session1=audit)
    assert esys.tcti.last_error is not None
    assert esys.tcti.last_error.errno == errno.EINVAL
    # Without the session the space's own list comes back.
    assert raw.handles(0x80000000) == (False, [own])
