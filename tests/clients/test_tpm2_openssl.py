"""tpm2-openssl (OpenSSL 3's tpm2 provider) through the node: TPM2OPENSSL_TCTI=device:NODE.

Keys are generated in the TPM and used by the provider; their public halves are checked
with plain OpenSSL (no TPM), so a wrong signature cannot pass.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.clients.tools import run

TPM = ["-provider", "tpm2", "-provider", "default"]
MESSAGE = b"signed in the TPM behind cusetpm\n"


def openssl(tcti: str, cwd: Path, *argv: str) -> bytes:
    return run(["openssl", *argv], cwd, {"TPM2OPENSSL_TCTI": tcti}).stdout


def tpm_key(tcti: str, cwd: Path, name: str, *genpkey: str) -> None:
    """NAME.pem: a key generated in the TPM (the provider's wrapped blob); NAME.pub: its
    public half as plain PEM."""
    openssl(tcti, cwd, "genpkey", *TPM, *genpkey, "-out", f"{name}.pem")
    assert b"TSS2 PRIVATE KEY" in (cwd / f"{name}.pem").read_bytes()  # not a software key
    openssl(tcti, cwd, "pkey", *TPM, "-in", f"{name}.pem", "-pubout", "-out", f"{name}.pub")


def verify(cwd: Path, pub: str, signature: str, *opts: str) -> None:
    """Plain OpenSSL, no provider of ours: the signature over MESSAGE must check."""
    done = run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", signature,
                *opts, "message"], cwd)
    assert done.stdout.strip() == b"Verified OK"
    (cwd / "tampered").write_bytes(MESSAGE + b"!")
    bad = run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", signature,
               *opts, "tampered"], cwd, check=False)
    assert (bad.returncode, bad.stdout.strip()) == (1, b"Verification failure"), bad


@pytest.mark.parametrize("algorithm", ["rsa2048", "p256"])
def test_keys_in_the_tpm_sign_pkeyutl_and_dgst(tcti: str, tmp_path: Path,
                                               algorithm: str) -> None:
    genpkey = (["-algorithm", "RSA", "-pkeyopt", "bits:2048"] if algorithm == "rsa2048"
               else ["-algorithm", "EC", "-pkeyopt", "group:P-256"])
    tpm_key(tcti, tmp_path, "key", *genpkey)
    (tmp_path / "message").write_bytes(MESSAGE)
    openssl(tcti, tmp_path, "dgst", "-sha256", "-binary", "-out", "digest", "message")
    openssl(tcti, tmp_path, "pkeyutl", *TPM, "-sign", "-inkey", "key.pem", "-in", "digest",
            "-pkeyopt", "digest:sha256", "-out", "sig.pkeyutl")
    verify(tmp_path, "key.pub", "sig.pkeyutl")
    # Plain `dgst -sign` picks the default provider for the digest in OpenSSL 3.0; the
    # property query sends the signature to the TPM.
    openssl(tcti, tmp_path, "dgst", *TPM, "-propquery", "?provider=tpm2", "-sha256",
            "-sign", "key.pem", "-out", "sig.dgst", "message")
    verify(tmp_path, "key.pub", "sig.dgst")
    if algorithm == "rsa2048":  # PKCS#1 v1.5 is deterministic: both paths give one signature
        assert (tmp_path / "sig.pkeyutl").read_bytes() == (tmp_path / "sig.dgst").read_bytes()


def self_signed(tcti: str, cwd: Path) -> None:
    """key.pem (RSA-2048 in the TPM), cert.pem: self-signed by it, checked by plain OpenSSL."""
    tpm_key(tcti, cwd, "key", "-algorithm", "RSA", "-pkeyopt", "bits:2048")
    openssl(tcti, cwd, "req", *TPM, "-propquery", "?provider=tpm2", "-new", "-x509",
            "-key", "key.pem", "-subj", "/CN=cusetpm test", "-days", "1", "-out", "cert.pem")
    done = run(["openssl", "verify", "-CAfile", "cert.pem", "cert.pem"], cwd)
    assert done.stdout.strip() == b"cert.pem: OK"
    pub = run(["openssl", "x509", "-in", "cert.pem", "-noout", "-pubkey"], cwd).stdout
    assert pub == (cwd / "key.pub").read_bytes()  # the certificate carries the TPM's key


def test_self_signed_certificate(tcti: str, tmp_path: Path) -> None:
    self_signed(tcti, tmp_path)
    subject = run(["openssl", "x509", "-in", "cert.pem", "-noout", "-subject"], tmp_path)
    assert b"CN = cusetpm test" in subject.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_tls_handshake_with_the_server_key_in_the_tpm(tcti: str, tmp_path: Path) -> None:
    """tpm2-openssl's README says the kernel's RM is not enough for a TLS server: s_server
    keeps its TPM key loaded in its own space while the handshake signs with it."""
    self_signed(tcti, tmp_path)
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", *TPM, "-propquery", "?provider=tpm2", "-accept",
         f"127.0.0.1:{port}", "-key", "key.pem", "-cert", "cert.pem", "-naccept", "1",
         "-tls1_3"],
        cwd=tmp_path, env={**os.environ, "TPM2OPENSSL_TCTI": tcti},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        for line in server.stdout:  # ready once it says so
            if line.startswith(b"ACCEPT"):
                break
        client = run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                      "-CAfile", "cert.pem", "-verify_return_error", "-servername",
                      "cusetpm", "-tls1_3"], tmp_path, input=b"hello over TLS\n",
                     timeout=60)
        out = client.stdout
        assert b"Verify return code: 0 (ok)" in out
        assert b"Peer signature type: RSA-PSS" in out  # TLS 1.3 signs with PSS: the TPM did
        assert b"subject=CN = cusetpm test" in out
        # Read until the data shows (s_server exits after its one connection): closing its
        # stdin first, as communicate() does, makes it quit before a slow guest printed it.
        server_out = b""
        for line in server.stdout:
            server_out += line
            if b"hello over TLS" in line:
                break
        assert b"hello over TLS" in server_out  # data crossed the TPM-keyed channel
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
