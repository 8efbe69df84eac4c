"""Session continuation: a session the client saves itself outlives its descriptor.

Contract (issue "Global TPM resources", DESIGN.md): ContextSave of a session handle (no auth
area) takes the session out of the saving space (the saver cannot name it any more), and the
client gets a TPMS_CONTEXT carrying the real sequence and handle with a token as the blob.
The session survives the saver's close; any descriptor presenting the blob may ContextLoad it,
and then it belongs to that space. A token is good once: presented again, or after its session
was flushed or evicted, it gets a 10-byte RM-layer TPM_RC_HANDLE|P|1 (0x000B01CB), never
another space's session. Abandoned sessions (saved, saver closed) are bounded
(max_abandoned_sessions, oldest flushed first). While the saver is open, its saved session
counts against its max_sessions.
"""

from __future__ import annotations

import os

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_SE, TPMA_OBJECT, TPMA_SESSION
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_CONTEXT,
    TPMS_SENSITIVE_CREATE,
)

from cusetpm.rm import ResourceManager, RMConfig
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_RH, TPM_SE
from cusetpm.tpm.structures import TPMS_CONTEXT as RawContext
from tests.rm.client import (
    AES_CFB,
    CONTINUE,
    NULL_SYM,
    RC_RM_SESSION_MEMORY,
    RC_STALE_TOKEN,
    RawClient,
    assert_answered_as_absent,
    esapi,
    policy_restart_command,
    rc_of,
    space_sessions,
    start_session_command,
)
from tests.rm.conftest import RMFactory, assert_tpm_empty

# These tests check the eager discipline (nothing of a space in the TPM between commands:
# census, saved contexts, round trips); resident mode is covered by test_residency.py until
# they are rewritten to hold in both modes.
pytestmark = pytest.mark.residency("eager")

INDEX = 0x00FFFFFF


def new_client(rm: ResourceManager) -> RawClient:
    return RawClient(rm, rm.open_space())


def usable(client: RawClient, session: int) -> bool:
    """PolicyRestart on a policy session the space owns succeeds at the TPM."""
    return rc_of(client.send(policy_restart_command(session))) == 0


def assert_refused_token(client: RawClient, blob: bytes) -> None:
    """A spent or dead token: the RM's own 10-byte answer, nothing joins the space."""
    before = space_sessions(client)
    response = client.send(build.context_load_raw(blob))
    assert len(response) == 10, response.hex()
    assert rc_of(response) == RC_STALE_TOKEN, hex(rc_of(response))
    assert space_sessions(client) == before


def saved_indices(rm: ResourceManager) -> list[int]:
    census = rm.tpm_census()
    assert census["transient"] == [] and census["loaded_sessions"] == [], census
    return sorted(h & INDEX for h in census["saved_sessions"])


# -- the token ---------------------------------------------------------------------------------


def test_client_gets_a_token_with_the_real_sequence_and_handle(rm: ResourceManager) -> None:
    a = new_client(rm)
    session = a.start_session(TPM_SE.POLICY)
    assert usable(a, session)
    entry = rm.sessions.get(session)
    assert entry is not None and entry.context is not None
    real = RawContext.from_bytes(entry.context)
    blob = a.context_save(session)
    saved = RawContext.from_bytes(blob)
    assert saved.savedHandle == session
    assert saved.sequence == real.sequence
    assert saved.hierarchy == TPM_RH.NULL
    # the blob is a token, not the TPM's context (the RM keeps that and may re-save it)
    assert saved.contextBlob != real.contextBlob
    assert rm.sessions.get(session) is entry and entry.context is not None
    # another save (after loading it back) gives another token
    assert a.context_load(blob) == session
    again = RawContext.from_bytes(a.context_save(session))
    assert again.contextBlob != saved.contextBlob
    rm.close_space(a.space)
    # the session was abandoned, not flushed: clean it up through a new space
    b = new_client(rm)
    assert b.context_load(again.to_bytes()) == session
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def test_saver_can_no_longer_use_the_handle(rm: ResourceManager) -> None:
    a = new_client(rm)
    session = a.start_session(TPM_SE.POLICY)
    kept = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(session)
    assert space_sessions(a) == [kept]
    assert_answered_as_absent(a, policy_restart_command(session), session)
    assert_answered_as_absent(a, build.flush_context(session), session)
    assert_answered_as_absent(a, build.context_save(session), session)
    assert usable(a, kept)
    # the session is still in the TPM, kept for whoever presents the blob
    assert saved_indices(rm) == sorted([session & INDEX, kept & INDEX])
    assert a.context_load(blob) == session
    assert usable(a, session)
    rm.close_space(a.space)
    assert_tpm_empty(rm)


# -- moving between spaces ---------------------------------------------------------------------


def test_survives_the_saver_close_and_joins_the_loader(rm: ResourceManager) -> None:
    a, bystander = new_client(rm), new_client(rm)
    session = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(session)
    rm.close_space(a.space)
    assert saved_indices(rm) == [session & INDEX]
    b = new_client(rm)
    assert b.context_load(blob) == session
    assert space_sessions(b) == [session]
    assert usable(b, session)
    assert space_sessions(bystander) == []
    assert_answered_as_absent(bystander, policy_restart_command(session), session)
    rm.close_space(b.space)  # it is b's now: b's close flushes it
    assert saved_indices(rm) == []
    rm.close_space(bystander.space)
    assert_tpm_empty(rm)


def test_load_while_the_saver_is_still_open(rm: ResourceManager) -> None:
    a, b = new_client(rm), new_client(rm)
    session = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(session)
    assert b.context_load(blob) == session
    assert usable(b, session)
    assert_answered_as_absent(a, policy_restart_command(session), session)
    assert space_sessions(a) == []
    # a's close does not touch what b owns now
    rm.close_space(a.space)
    assert usable(b, session)
    b.flush(session)
    assert saved_indices(rm) == []
    rm.close_space(b.space)
    assert_tpm_empty(rm)


def test_chain_of_spaces_each_saving_for_the_next(rm: ResourceManager) -> None:
    """tpm2-tools' one-process-per-step flow, ten steps long, raw."""
    first = new_client(rm)
    session = first.start_session(TPM_SE.POLICY)
    blob = first.context_save(session)
    rm.close_space(first.space)
    spent = []
    for _ in range(10):
        step = new_client(rm)
        assert step.context_load(blob) == session
        assert usable(step, session)
        spent.append(blob)
        blob = step.context_save(session)
        rm.close_space(step.space)
        assert saved_indices(rm) == [session & INDEX]
    last = new_client(rm)
    for old in spent:
        assert_refused_token(last, old)
    assert last.context_load(blob) == session
    rm.close_space(last.space)
    assert_tpm_empty(rm)


# -- one use per token -------------------------------------------------------------------------


def test_a_token_presented_twice_is_refused(rm: ResourceManager) -> None:
    a, b, c = new_client(rm), new_client(rm), new_client(rm)
    session = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(session)
    assert b.context_load(blob) == session
    assert_refused_token(c, blob)
    assert_refused_token(b, blob)  # not even its new owner gets it twice
    assert_refused_token(a, blob)  # nor the saver
    assert usable(b, session)
    assert_answered_as_absent(c, policy_restart_command(session), session)
    for client in (a, b, c):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_a_token_of_a_flushed_session_never_gives_the_reused_handle(rm: ResourceManager) -> None:
    """The TPM reuses the number of a flushed session: the old token must not reach it."""
    a, b, c, d = (new_client(rm) for _ in range(4))
    session = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(session)
    assert b.context_load(blob) == session
    b.flush(session)
    reused = c.start_session(TPM_SE.POLICY)
    assert reused == session  # libtpms hands out the lowest free slot: the same number
    assert_refused_token(d, blob)
    assert_refused_token(b, blob)
    assert space_sessions(c) == [reused]
    assert usable(c, reused)
    assert_answered_as_absent(d, policy_restart_command(reused), reused)
    for client in (a, b, c, d):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_a_forged_token_naming_another_space_session_is_refused(rm: ResourceManager) -> None:
    owner, thief = new_client(rm), new_client(rm)
    session = owner.start_session(TPM_SE.POLICY)
    real = RawContext.from_bytes(owner.context_save(session))
    assert owner.context_load(real.to_bytes()) == session
    # same shape as a token (magic and size), random secret, the victim's handle and sequence
    forged = RawContext(real.sequence, session, TPM_RH.NULL, real.contextBlob[:16] + os.urandom(32))
    assert len(forged.contextBlob) == len(real.contextBlob)
    assert_refused_token(thief, forged.to_bytes())
    # the genuine (spent) token does not help either
    assert_refused_token(thief, real.to_bytes())
    assert usable(owner, session)
    assert space_sessions(owner) == [session]
    rm.close_space(owner.space)
    rm.close_space(thief.space)
    assert_tpm_empty(rm)


# -- limits ------------------------------------------------------------------------------------


def test_a_saved_session_counts_against_the_saver_while_it_is_open(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_sessions=2))
    a, b, c = new_client(rm), new_client(rm), new_client(rm)
    first = a.start_session(TPM_SE.POLICY)
    second = a.start_session(TPM_SE.POLICY)
    blob = a.context_save(second)
    # a holds one session and one token: at its limit
    response = a.send(start_session_command())
    assert rc_of(response) == RC_RM_SESSION_MEMORY, hex(rc_of(response))
    # the saver may load its own token at its limit (it is already counted)
    assert a.context_load(blob) == second
    blob = a.context_save(second)
    # b at its limit cannot take a's session; the token stays good
    b_sessions = [b.start_session(TPM_SE.POLICY), b.start_session(TPM_SE.POLICY)]
    response = b.send(build.context_load_raw(blob))
    assert rc_of(response) == RC_RM_SESSION_MEMORY, hex(rc_of(response))
    assert space_sessions(b) == sorted(b_sessions, key=lambda h: h & INDEX)
    # c takes it: a is below its limit again
    assert c.context_load(blob) == second
    third = a.start_session(TPM_SE.POLICY)
    assert usable(a, first) and usable(a, third) and usable(c, second)
    # a token abandoned by a closed saver counts against nobody
    blob = c.context_save(second)
    rm.close_space(c.space)
    d = new_client(rm)
    d_sessions = [d.start_session(TPM_SE.POLICY), d.start_session(TPM_SE.POLICY)]
    for h in d_sessions:
        d.flush(h)
    assert d.context_load(blob) == second
    for client in (a, b, d):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


@pytest.mark.parametrize("limit", [3, 16])
def test_abandoned_sessions_are_bounded_oldest_first(make_rm: RMFactory, limit: int) -> None:
    rm = make_rm(RMConfig(max_abandoned_sessions=limit) if limit != 16 else None)
    assert rm.config.max_abandoned_sessions == limit
    extra = 2
    saved: list[tuple[int, bytes]] = []
    for _ in range(limit + extra):
        saver = new_client(rm)
        session = saver.start_session(TPM_SE.POLICY)
        saved.append((session, saver.context_save(session)))
        rm.close_space(saver.space)
    survivors = saved[extra:]
    assert saved_indices(rm) == sorted(h & INDEX for h, _ in survivors)
    loader = new_client(rm)
    for _, blob in saved[:extra]:
        assert_refused_token(loader, blob)
    for session, blob in survivors:
        assert loader.context_load(blob) == session
        assert usable(loader, session)
    rm.close_space(loader.space)
    assert_tpm_empty(rm)


def test_pruned_abandoned_token_never_reaches_the_reused_number(make_rm: RMFactory) -> None:
    rm = make_rm(RMConfig(max_abandoned_sessions=1))
    a = new_client(rm)
    old = a.start_session(TPM_SE.POLICY)
    old_blob = a.context_save(old)
    rm.close_space(a.space)
    b = new_client(rm)
    kept = b.start_session(TPM_SE.POLICY)
    kept_blob = b.context_save(kept)
    rm.close_space(b.space)  # old is pruned: one abandoned session at most
    assert saved_indices(rm) == [kept & INDEX]
    c = new_client(rm)
    reused = c.start_session(TPM_SE.POLICY)
    assert reused == old  # the pruned session's number, now c's
    d = new_client(rm)
    assert_refused_token(d, old_blob)
    assert_answered_as_absent(d, policy_restart_command(reused), reused)
    assert usable(c, reused)
    assert d.context_load(kept_blob) == kept
    for client in (c, d):
        rm.close_space(client.space)
    assert_tpm_empty(rm)


def test_saver_closing_with_several_tokens_and_sessions(rm: ResourceManager) -> None:
    """Close flushes what the space owns and abandons only what it saved."""
    a = new_client(rm)
    owned = [a.start_session(TPM_SE.POLICY) for _ in range(3)]
    saved = [a.start_session(TPM_SE.POLICY) for _ in range(3)]
    blobs = [a.context_save(h) for h in saved]
    rm.close_space(a.space)
    assert saved_indices(rm) == sorted(h & INDEX for h in saved)
    b = new_client(rm)
    for h in owned:
        assert_answered_as_absent(b, policy_restart_command(h), h)
    for h, blob in zip(saved, blobs, strict=True):
        assert b.context_load(blob) == h
        assert usable(b, h)
    rm.close_space(b.space)
    assert_tpm_empty(rm)


# -- through ESAPI: real HMACs, real parameter encryption, a real policy -----------------------


def serialized(context: TPMS_CONTEXT) -> bytes:
    """What tpm2-tools would write to a file between two processes."""
    return bytes(context.marshal())


def deserialized(data: bytes) -> TPMS_CONTEXT:
    context, used = TPMS_CONTEXT.unmarshal(data)
    assert used == len(data)
    return context


def test_esapi_encrypt_session_continues_in_another_space(rm: ResourceManager) -> None:
    one = rm.open_space()
    esys1 = esapi(rm, one)
    primary = esys1.tr_from_tpmpublic(RawClient(rm, one).create_primary())
    session = esys1.start_auth_session(
        primary, ESYS_TR.NONE, TPM2_SE.HMAC, AES_CFB, TPM2_ALG.SHA256
    )
    attrs = CONTINUE | TPMA_SESSION.ENCRYPT
    esys1.trsess_set_attributes(session, attrs)
    assert len(esys1.get_random(16, session1=session)) == 16
    handle = esys1.tr_get_tpm_handle(session)
    context = serialized(esys1.context_save(session))
    esys1.close()
    rm.close_space(one)

    two = rm.open_space()
    esys2 = esapi(rm, two)
    restored = esys2.context_load(deserialized(context))
    assert esys2.tr_get_tpm_handle(restored) == handle
    esys2.trsess_set_attributes(restored, attrs)
    seen = set()
    for _ in range(3):
        # the response is encrypted and HMACed with the session's key and rolling nonces:
        # ESAPI decrypts it and checks the HMAC, so the session state crossed intact
        random = bytes(esys2.get_random(16, session1=restored))
        assert len(random) == 16
        seen.add(random)
    assert len(seen) == 3
    esys2.flush_context(restored)
    esys2.close()
    rm.close_space(two)
    assert_tpm_empty(rm)


SEAL_ATTRS = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT


def test_esapi_policy_sealed_unseal_across_three_spaces(rm: ResourceManager) -> None:
    """start+save (space 1) → load, PolicyPCR, save (space 2) → load, Unseal (space 3)."""
    secret = os.urandom(32)
    setup = rm.open_space()
    esys0 = esapi(rm, setup)
    primary0 = esys0.tr_from_tpmpublic(RawClient(rm, setup).create_primary())
    trial = esys0.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, NULL_SYM, TPM2_ALG.SHA256
    )
    esys0.policy_pcr(trial, b"", "sha256:16")
    policy = bytes(esys0.policy_get_digest(trial))
    esys0.flush_context(trial)
    template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=SEAL_ATTRS)
    template.publicArea.authPolicy = policy
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=secret))
    private, public, *_ = esys0.create(primary0, sensitive, template)
    esys0.close()
    rm.close_space(setup)

    one = rm.open_space()
    esys1 = esapi(rm, one)
    session = esys1.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, NULL_SYM, TPM2_ALG.SHA256
    )
    handle = esys1.tr_get_tpm_handle(session)
    step1 = serialized(esys1.context_save(session))
    esys1.close()
    rm.close_space(one)

    two = rm.open_space()
    esys2 = esapi(rm, two)
    session = esys2.context_load(deserialized(step1))
    assert esys2.tr_get_tpm_handle(session) == handle
    esys2.policy_pcr(session, b"", "sha256:16")
    step2 = serialized(esys2.context_save(session))
    esys2.close()
    rm.close_space(two)

    three = rm.open_space()
    esys3 = esapi(rm, three)
    primary3 = esys3.tr_from_tpmpublic(RawClient(rm, three).create_primary())
    item = esys3.load(primary3, private, public)
    # a fresh policy session without the PolicyPCR step is refused: the digest that unseals
    # below really came from space 2
    fresh = esys3.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, NULL_SYM, TPM2_ALG.SHA256
    )
    with pytest.raises(TSS2_Exception) as info:
        esys3.unseal(item, session1=fresh)
    assert info.value.error == TPM2_RC.POLICY_FAIL
    esys3.flush_context(fresh)
    session = esys3.context_load(deserialized(step2))
    assert esys3.tr_get_tpm_handle(session) == handle
    assert bytes(esys3.policy_get_digest(session)) == policy
    esys3.trsess_set_attributes(session, TPMA_SESSION(0))  # the unseal ends it
    assert bytes(esys3.unseal(item, session1=session)) == secret
    assert handle & INDEX not in saved_indices(rm)
    # the step-1 and step-2 blobs are spent
    probe = new_client(rm)
    assert_refused_token(probe, _raw(step1))
    assert_refused_token(probe, _raw(step2))
    rm.close_space(probe.space)
    esys3.close()
    rm.close_space(three)
    assert_tpm_empty(rm)


def _raw(esys_context: bytes) -> bytes:
    """The TPMS_CONTEXT ESAPI would send to the TPM for this saved ESAPI context: ESAPI wraps
    the TPM's blob in contextBlob with its own metadata (IESYS_CONTEXT_DATA: a reserved
    UINT32, the TPM2B_CONTEXT_DATA, then ESAPI's metadata)."""
    context = deserialized(esys_context)
    blob = bytes(context.contextBlob)
    size = int.from_bytes(blob[4:6], "big")
    inner = blob[6 : 6 + size]
    assert inner.startswith(b"cusetpm session")  # the RM's token went through ESAPI intact
    return RawContext(context.sequence, context.savedHandle, context.hierarchy, inner).to_bytes()
