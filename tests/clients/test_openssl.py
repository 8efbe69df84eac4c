"""tpm2-openssl through the node (TPM2OPENSSL_TCTI=device:NODE): keys live in the TPM.

Signatures are made by the TPM and verified by plain OpenSSL (no provider); plain
`dgst -sign` picks the wrong provider in OpenSSL 3.0, hence `-propquery '?provider=tpm2'`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

TPM = ["-provider", "tpm2", "-provider", "default"]
PROPQUERY = ["-propquery", "?provider=tpm2"]


def openssl(tcti: str, cwd: Path, *argv: str) -> bytes:
    env = {**os.environ, "TPM2OPENSSL_TCTI": tcti}
    done = subprocess.run(["openssl", *argv], cwd=cwd, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, f"openssl {' '.join(argv)}: {done.stderr.decode()}"
    return done.stdout


@pytest.mark.parametrize("algorithm,option", [("RSA", "bits:2048"), ("EC", "group:P-256")])
def test_tpm_key_signs_and_certifies(tcti: str, tmp_path: Path, algorithm: str,
                                     option: str) -> None:
    run = lambda *argv: openssl(tcti, tmp_path, *argv)  # noqa: E731
    run("genpkey", *TPM, "-algorithm", algorithm, "-pkeyopt", option, "-out", "key.pem")
    assert (tmp_path / "key.pem").read_text().startswith("-----BEGIN TSS2 PRIVATE KEY-----")
    run("pkey", *TPM, "-in", "key.pem", "-pubout", "-out", "key.pub")
    (tmp_path / "msg").write_bytes(b"signed in the TPM behind cusetpm")
    run("dgst", "-sha256", "-binary", "-out", "msg.dgst", "msg")
    run("pkeyutl", *TPM, "-sign", "-inkey", "key.pem", "-in", "msg.dgst", "-out", "p.sig",
        "-pkeyopt", "digest:sha256")
    assert b"Signature Verified Successfully" in run(
        "pkeyutl", "-verify", "-pubin", "-inkey", "key.pub", "-in", "msg.dgst",
        "-sigfile", "p.sig", "-pkeyopt", "digest:sha256")
    run("dgst", *TPM, *PROPQUERY, "-sha256", "-sign", "key.pem", "-out", "d.sig", "msg")
    assert b"Verified OK" in run("dgst", "-sha256", "-verify", "key.pub", "-signature",
                                 "d.sig", "msg")
    # A wrong message must not verify with the TPM's signature.
    (tmp_path / "other").write_bytes(b"not what the TPM signed")
    env = {**os.environ}
    bad = subprocess.run(["openssl", "dgst", "-sha256", "-verify", "key.pub", "-signature",
                          "d.sig", "other"], cwd=tmp_path, env=env, capture_output=True)
    assert bad.returncode != 0 and b"Verification failure" in bad.stdout + bad.stderr
    run("req", *TPM, *PROPQUERY, "-new", "-x509", "-key", "key.pem", "-subj", "/CN=cusetpm",
        "-days", "1", "-out", "cert.pem")
    assert b"cert.pem: OK" in run("verify", "-CAfile", "cert.pem", "cert.pem")
    cert_pub = run("x509", "-in", "cert.pem", "-noout", "-pubkey")
    assert cert_pub == (tmp_path / "key.pub").read_bytes()
