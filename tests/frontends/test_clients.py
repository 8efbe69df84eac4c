"""Unmodified clients on the node: tpm2-tools and tpm2-pytss with `-T device:DIR/tpmrm0`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.frontends import tpmwire as wire


def tools(tcti: str, cwd: Path, *argv: str, input: bytes | None = None) -> bytes:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (Debian package tpm2-tools)")
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti}
    done = subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.decode()}"
    return done.stdout


def transient_handles(node: str) -> list[int]:
    fd = os.open(node, os.O_RDWR)
    try:
        os.write(fd, wire.get_handles(wire.TPM_HT_TRANSIENT))
        return wire.handles(os.read(fd, 4096))
    finally:
        os.close(fd)


def test_tpm2_tools_keys_and_signatures(node: str, tcti: str, tmp_path: Path) -> None:
    assert len(tools(tcti, tmp_path, "tpm2_getrandom", "16")) == 16
    tools(tcti, tmp_path, "tpm2_createprimary", "-C", "o", "-c", "primary.ctx")
    tools(tcti, tmp_path, "tpm2_create", "-C", "primary.ctx", "-G", "ecc",
          "-u", "key.pub", "-r", "key.priv")
    tools(tcti, tmp_path, "tpm2_load", "-C", "primary.ctx", "-u", "key.pub",
          "-r", "key.priv", "-c", "key.ctx")
    (tmp_path / "message").write_bytes(b"cusetpm")
    tools(tcti, tmp_path, "tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig",
          "message")
    tools(tcti, tmp_path, "tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256",
          "-s", "sig", "-m", "message")
    tools(tcti, tmp_path, "tpm2_flushcontext", "-t")
    out = tools(tcti, tmp_path, "tpm2_getcap", "handles-transient")
    assert out.strip() in (b"", b"[]")  # every tool exited: its space is gone
    assert transient_handles(node) == []


def test_tpm2_tools_policy_session_unseal(tcti: str, tmp_path: Path) -> None:
    secret = b"sealed by cusetpm"
    (tmp_path / "secret").write_bytes(secret)
    run = lambda *argv: tools(tcti, tmp_path, *argv)  # noqa: E731
    run("tpm2_createprimary", "-C", "o", "-c", "primary.ctx")
    run("tpm2_startauthsession", "-S", "trial.ctx")
    run("tpm2_policypcr", "-S", "trial.ctx", "-l", "sha256:0,1", "-L", "policy.dat")
    run("tpm2_flushcontext", "trial.ctx")
    run("tpm2_create", "-C", "primary.ctx", "-L", "policy.dat", "-i", "secret",
        "-u", "seal.pub", "-r", "seal.priv")
    run("tpm2_load", "-C", "primary.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
    # The policy session outlives each tool (saved to a file) and is used by the next one.
    run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
    run("tpm2_policypcr", "-S", "session.ctx", "-l", "sha256:0,1")
    assert run("tpm2_unseal", "-c", "seal.ctx", "-p", "session:session.ctx") == secret
    run("tpm2_flushcontext", "session.ctx")


PYTSS_CLIENT = textwrap.dedent("""
    import sys
    from tpm2_pytss import ESAPI, TCTILdr, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SYM_DEF
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT, TPMA_SESSION

    rounds = int(sys.argv[2])
    with ESAPI(TCTILdr("device", sys.argv[1])) as esys:
        primary = esys.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER)[0]
        # A salted HMAC session with parameter encryption both ways.
        session = esys.start_auth_session(
            tpm_key=primary, bind=ESYS_TR.NONE, session_type=TPM2_SE.HMAC,
            symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits={"aes": 128},
                                   mode={"aes": TPM2_ALG.CFB}),
            auth_hash=TPM2_ALG.SHA256)
        esys.trsess_set_attributes(
            session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
            | TPMA_SESSION.ENCRYPT)
        seen = set()
        for _ in range(rounds):
            seen.add(bytes(esys.get_random(16, session1=session)))
        assert len(seen) == rounds
        signing = (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.FIXEDTPM
                   | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
        key = esys.create_primary(  # its sensitive part travels encrypted
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", signing),
            ESYS_TR.OWNER, session1=session)[0]
        esys.flush_context(key)
        esys.flush_context(session)
        esys.flush_context(primary)
    print("ok")
""")


def run_pytss(node: str, rounds: int) -> subprocess.Popen[str]:
    pytest.importorskip("tpm2_pytss")
    return subprocess.Popen(
        [sys.executable, "-c", PYTSS_CLIENT, node, str(rounds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_tpm2_pytss_hmac_session_with_parameter_encryption(node: str) -> None:
    proc = run_pytss(node, 20)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "ok", err


def test_eight_client_processes_at_once(node: str) -> None:
    procs = [run_pytss(node, 50) for _ in range(8)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert transient_handles(node) == []
