"""tpm2-pytss's ESAPI through the node (TCTILdr("device", NODE)), in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tpm2_pytss import (
    ESAPI,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2_ST, TPMA_SESSION

SIGNING = "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
STORAGE = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"


@pytest.fixture
def esys(node: str) -> Iterator[ESAPI]:
    # ESAPI.close() does not close a TCTI it was given: close it too, or its descriptor
    # (a space on the node) lives on until garbage collection.
    with TCTILdr("device", node) as tcti, ESAPI(tcti) as ctx:
        yield ctx


@pytest.fixture
def primary(esys: ESAPI) -> Iterator[ESYS_TR]:
    handle = esys.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb", objectAttributes=STORAGE), ESYS_TR.OWNER)[0]
    yield handle
    esys.flush_context(handle)


def null_ticket() -> TPMT_TK_HASHCHECK:
    return TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=ESYS_TR.RH_NULL)


def salted_session(esys: ESAPI, salt_key: ESYS_TR) -> ESYS_TR:
    session = esys.start_auth_session(
        tpm_key=salt_key, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
        symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits={"aes": 128},
                               mode={"aes": TPM2_ALG.CFB}),
        auth_hash=TPM2_ALG.SHA256)
    esys.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION
                               | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT)
    return session


def test_salted_session_with_parameter_encryption(esys: ESAPI, primary: ESYS_TR) -> None:
    session = salted_session(esys, primary)
    randoms = {bytes(esys.get_random(16, session1=session)) for _ in range(8)}
    assert len(randoms) == 8  # encrypted responses decrypted to distinct values
    secret = b"travels encrypted both ways"
    sealed = TPM2B_SENSITIVE_CREATE()
    sealed.sensitive.data = secret
    private, public = esys.create(primary, sealed, TPM2B_PUBLIC.parse(
        "keyedhash", objectAttributes="fixedtpm|fixedparent|userwithauth"), session1=session)[:2]
    obj = esys.load(primary, private, public)
    # Unseal's response parameter comes back encrypted, Create's command parameter went so.
    assert bytes(esys.unseal(obj, session1=session)) == secret
    esys.flush_context(obj)
    esys.flush_context(session)


def policy_pcr_session(esys: ESAPI, pcrs: TPML_PCR_SELECTION, trial: bool) -> ESYS_TR:
    session = esys.start_auth_session(
        tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE,
        session_type=TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
        symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), auth_hash=TPM2_ALG.SHA256)
    esys.policy_pcr(session, TPM2B_DIGEST(), pcrs)
    return session


def sealed_to_pcr(esys: ESAPI, primary: ESYS_TR, secret: bytes,
                  pcrs: TPML_PCR_SELECTION) -> ESYS_TR:
    trial = policy_pcr_session(esys, pcrs, trial=True)
    policy = esys.policy_get_digest(trial)
    esys.flush_context(trial)
    sensitive = TPM2B_SENSITIVE_CREATE()
    sensitive.sensitive.data = secret
    template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes="fixedtpm|fixedparent")
    template.publicArea.authPolicy = policy
    private, public = esys.create(primary, sensitive, template)[:2]
    return esys.load(primary, private, public)


def test_flush_of_a_session_the_tpm_ended(esys: ESAPI, primary: ESYS_TR) -> None:
    """Unseal with a policy session without continueSession: the TPM ends the session.
    Flushing it then gets the TPM's own answer for an absent handle (as on the kernel),
    and the ESAPI context goes on."""
    pcrs = TPML_PCR_SELECTION.parse("sha256:23")
    secret = b"one use"
    sealed = sealed_to_pcr(esys, primary, secret, pcrs)
    session = policy_pcr_session(esys, pcrs, trial=False)
    esys.trsess_set_attributes(session, TPMA_SESSION(0))  # no continueSession
    assert bytes(esys.unseal(sealed, session1=session)) == secret
    with pytest.raises(TSS2_Exception) as refused:
        esys.flush_context(session)
    # TPM_RC_HANDLE | TPM_RC_P | TPM_RC_1 (0x1CB): a TPM response, not a transport failure.
    assert refused.value.rc == 0x000001CB, hex(refused.value.rc)
    assert len(esys.get_random(8)) == 8  # the context survived
    esys.flush_context(sealed)
