"""tpm2-pytss's ESAPI through the node (TCTILdr("device", NODE)), in this process.

Signatures are checked twice: by the TPM's VerifySignature and by `cryptography` (a
dependency of tpm2-pytss itself, so no new one), which knows nothing of the node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_SESSION,
)

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
    return TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)


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


# -- keys under a primary: create, load, sign, verify --------------------------------------


def null_scheme() -> TPMT_SIG_SCHEME:
    """The key's own scheme (its template names one)."""
    return TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)


def verify_outside(public: TPM2B_PUBLIC, message: bytes, signature: TPMT_SIGNATURE) -> None:
    """Raise InvalidSignature unless `signature` is `public`'s over SHA-256(message)."""
    key = serialization.load_pem_public_key(public.publicArea.to_pem())
    if signature.sigAlg == TPM2_ALG.ECDSA:
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    else:
        assert signature.sigAlg == TPM2_ALG.RSASSA, signature.sigAlg
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
        key.verify(bytes(signature.signature.rsassa.sig), message, padding.PKCS1v15(),
                   hashes.SHA256())


@pytest.mark.parametrize(("template", "sig_alg"), [
    ("ecc256:ecdsa-sha256", TPM2_ALG.ECDSA),
    ("rsa2048:rsassa-sha256", TPM2_ALG.RSASSA),
], ids=["ecc-p256", "rsa-2048"])
def test_create_load_sign_verify(esys: ESAPI, primary: ESYS_TR, template: str,
                                 sig_alg: int) -> None:
    private, public = esys.create(primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
        template, objectAttributes=SIGNING))[:2]
    key = esys.load(primary, private, public)
    message = b"signed through cusetpm"
    digest = hashlib.sha256(message).digest()
    signature = esys.sign(key, digest, null_scheme(), null_ticket())
    assert signature.sigAlg == sig_alg
    ticket = esys.verify_signature(key, digest, signature)
    assert ticket.tag == TPM2_ST.VERIFIED
    verify_outside(public, message, signature)
    # Both verifiers can fail: the same signature over another message is refused by each.
    with pytest.raises(InvalidSignature):
        verify_outside(public, message + b"!", signature)
    with pytest.raises(TSS2_Exception) as refused:
        esys.verify_signature(key, hashlib.sha256(message + b"!").digest(), signature)
    assert refused.value.rc == TPM2_RC.SIGNATURE | TPM2_RC.P | TPM2_RC.RC2, \
        hex(refused.value.rc)
    esys.flush_context(key)


# -- a secret sealed to a PCR ---------------------------------------------------------------


def extend(esys: ESAPI, pcr: ESYS_TR) -> None:
    digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest={"sha256": b"\x11" * 32})
    esys.pcr_extend(pcr, TPML_DIGEST_VALUES([digest]))


def test_policy_pcr_unseal_refused_after_extend(esys: ESAPI, primary: ESYS_TR) -> None:
    """Unsealed with a policy session bound to PCR 16; after PCR_Extend(16) a fresh policy
    session records the new value and the TPM refuses the unseal with TPM_RC_POLICY_FAIL."""
    pcrs = TPML_PCR_SELECTION.parse("sha256:16")
    secret = b"bound to pcr 16"
    sealed = sealed_to_pcr(esys, primary, secret, pcrs)
    session = policy_pcr_session(esys, pcrs, trial=False)
    assert bytes(esys.unseal(sealed, session1=session)) == secret
    esys.flush_context(session)
    extend(esys, ESYS_TR.PCR16)
    session = policy_pcr_session(esys, pcrs, trial=False)
    with pytest.raises(TSS2_Exception) as refused:
        esys.unseal(sealed, session1=session)
    # TPM_RC_POLICY_FAIL in session 1 (0x99D), as the TPM itself answers.
    assert refused.value.rc == TPM2_RC.POLICY_FAIL | TPM2_RC.S | TPM2_RC.RC1, \
        hex(refused.value.rc)
    esys.flush_context(session)
    esys.flush_context(sealed)
