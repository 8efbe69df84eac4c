"""tpm2-pkcs11 through the node (TPM2_PKCS11_TCTI=device:NODE): tpm2_ptool builds the
token, OpenSC's pkcs11-tool generates keys and signs, plain OpenSSL verifies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.clients.tools import run

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
MESSAGE = b"signed through PKCS#11 by the TPM behind cusetpm"
# DER DigestInfo header of a SHA-256 digest (RFC 8017, 9.2 note 1): RSA-PKCS signs it as is.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@pytest.fixture(scope="module")
def token(tcti: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A token 'cusetpm' with a tpm2_ptool ECC key, an RSA-2048 and a P-256 keypair."""
    store = tmp_path_factory.mktemp("pkcs11")
    env = {"TPM2_PKCS11_STORE": str(store), "TPM2_PKCS11_TCTI": tcti, "TPM2TOOLS_TCTI": tcti}
    ptool = ["tpm2_ptool"]
    run([*ptool, "init", f"--path={store}"], store, env)
    run([*ptool, "addtoken", "--pid=1", "--label=cusetpm", "--userpin=1234", "--sopin=5678",
         f"--path={store}"], store, env)
    run([*ptool, "addkey", "--label=cusetpm", "--key-label=ptoolkey", "--userpin=1234",
         "--algorithm=ecc256", f"--path={store}"], store, env)
    for key_type, label, key_id in (("rsa:2048", "rsakey", "01"),
                                    ("EC:prime256v1", "eckey", "02")):
        run(["pkcs11-tool", "--module", MODULE, "--token-label", "cusetpm", "--login",
             "--pin", "1234", "--keypairgen", "--key-type", key_type, "--label", label,
             "--id", key_id], store, env)
    return env


def p11(token: dict[str, str], cwd: Path, *argv: str) -> bytes:
    return run(["pkcs11-tool", "--module", MODULE, "--token-label", "cusetpm", "--login",
                "--pin", "1234", *argv], cwd, token).stdout


def public_key(token: dict[str, str], cwd: Path, key_id: str) -> Path:
    p11(token, cwd, "--read-object", "--type", "pubkey", "--id", key_id, "-o", "pub.der")
    run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem"],
        cwd)
    return cwd / "pub.pem"


def test_token_and_objects_listed(token: dict[str, str], tmp_path: Path) -> None:
    slots = run(["pkcs11-tool", "--module", MODULE, "-L"], tmp_path, token).stdout
    assert b"token label        : cusetpm" in slots
    assert b"token initialized, PIN initialized" in slots
    objects = p11(token, tmp_path, "-O")
    for label in (b"ptoolkey", b"rsakey", b"eckey"):
        assert b"label:      " + label in objects
    assert objects.count(b"never extractable") == 3  # private halves stay in the TPM


def openssl_verify(cwd: Path, pub: Path, signature: bytes, *pkeyopt: str) -> None:
    (cwd / "digest").write_bytes(hashlib.sha256(MESSAGE).digest())
    (cwd / "sig").write_bytes(signature)
    opts = [arg for opt in ("digest:sha256", *pkeyopt) for arg in ("-pkeyopt", opt)]
    done = run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in",
                "digest", "-sigfile", "sig", *opts], cwd)
    assert done.stdout.strip() == b"Signature Verified Successfully"
    (cwd / "digest").write_bytes(hashlib.sha256(MESSAGE + b"!").digest())
    bad = run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-in",
               "digest", "-sigfile", "sig", *opts], cwd, check=False)
    assert (bad.returncode, bad.stdout.strip()) == (1, b"Signature Verification Failure"), bad


def sign(token: dict[str, str], cwd: Path, data: bytes, *argv: str) -> bytes:
    (cwd / "in").write_bytes(data)
    p11(token, cwd, "--sign", *argv, "-i", "in", "-o", "out")
    return (cwd / "out").read_bytes()


def test_rsa_pkcs(token: dict[str, str], tmp_path: Path) -> None:
    pub = public_key(token, tmp_path, "01")
    digest_info = SHA256_DIGEST_INFO + hashlib.sha256(MESSAGE).digest()
    signature = sign(token, tmp_path, digest_info, "--mechanism", "RSA-PKCS", "--id", "01")
    assert len(signature) == 256
    openssl_verify(tmp_path, pub, signature)


def test_rsa_pss(token: dict[str, str], tmp_path: Path) -> None:
    pub = public_key(token, tmp_path, "01")
    signature = sign(token, tmp_path, hashlib.sha256(MESSAGE).digest(),
                     "--mechanism", "RSA-PKCS-PSS", "--hash-algorithm", "SHA256",
                     "--mgf", "MGF1-SHA256", "--salt-len=-1", "--id", "01")
    openssl_verify(tmp_path, pub, signature, "rsa_padding_mode:pss", "rsa_pss_saltlen:auto")


@pytest.mark.parametrize("key_id", ["02", "ptoolkey"])
def test_ecdsa(token: dict[str, str], tmp_path: Path, key_id: str) -> None:
    select = ["--id", "02"] if key_id == "02" else ["--label", "ptoolkey"]
    if key_id == "ptoolkey":
        p11(token, tmp_path, "--read-object", "--type", "pubkey", "--label", "ptoolkey",
            "-o", "pub.der")
        run(["openssl", "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out",
             "pub.pem"], tmp_path)
        pub = tmp_path / "pub.pem"
    else:
        pub = public_key(token, tmp_path, "02")
    signature = sign(token, tmp_path, hashlib.sha256(MESSAGE).digest(), "--mechanism", "ECDSA",
                     "--signature-format", "openssl", *select)
    openssl_verify(tmp_path, pub, signature)
