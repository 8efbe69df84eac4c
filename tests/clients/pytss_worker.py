"""One tpm2-pytss client of test_concurrent.py: `python -m tests.clients.pytss_worker NODE SECONDS`.

Loops until SECONDS have passed (the iteration in flight finishes): a fresh ESAPI context
each time, a primary, a salted HMAC session with parameter encryption both ways, an ECC
key created, loaded and signing through that session, the signature verified by the TPM.
Everything it made is flushed. Prints the number of iterations; any failure raises.
"""

from __future__ import annotations

import hashlib
import sys
import time

from tpm2_pytss import (
    ESAPI,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TCTILdr,
)
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2_ST, TPMA_SESSION

STORAGE = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
SIGNING = "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"


def one_round(node: str, n: int) -> None:
    with ESAPI(TCTILdr("device", node)) as esys:
        primary = esys.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb", objectAttributes=STORAGE), ESYS_TR.OWNER)[0]
        session = esys.start_auth_session(
            tpm_key=primary, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits={"aes": 128},
                                   mode={"aes": TPM2_ALG.CFB}),
            auth_hash=TPM2_ALG.SHA256)
        esys.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION
                                   | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT)
        randoms = {bytes(esys.get_random(16, session1=session)) for _ in range(4)}
        assert len(randoms) == 4, "encrypted GetRandom answers repeat"
        private, public = esys.create(primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256", objectAttributes=SIGNING), session1=session)[:2]
        key = esys.load(primary, private, public, session1=session)
        digest = hashlib.sha256(f"round {n}".encode()).digest()
        signature = esys.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                              session1=session)
        assert esys.verify_signature(key, digest, signature).tag == TPM2_ST.VERIFIED
        esys.flush_context(key)
        esys.flush_context(session)
        esys.flush_context(primary)


def main() -> None:
    node, seconds = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        one_round(node, rounds)
        rounds += 1
    print(rounds)


if __name__ == "__main__":
    main()
