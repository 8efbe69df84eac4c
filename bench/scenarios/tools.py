"""Multi-step tpm2-tools scenarios, one process per step, contexts in files.

This is how people use tpm2-tools: every step is a new process (a new space),
so objects travel as context files and policy sessions must survive the
process that started them. The first scenario clears the TPM (tpm2_clear), so
run these only against a throw-away TPM state. ECC keys throughout: RSA
primaries take seconds each under the guest's TCG.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.scenarios import Outcome, scenario
from bench.scenarios.conn import Target

STEP_TIMEOUT = 180.0
PERSISTENT = "0x81000123"
NV_INDEX = "0x1500123"


class StepFailed(Exception):
    pass


class Steps:
    """Runs tpm2-tools commands in a scratch directory with the target's TCTI."""

    def __init__(self, target: Target, workdir: Path) -> None:
        self.cwd = workdir
        self.env = {**os.environ, **target.env, "TPM2TOOLS_TCTI": target.tcti}
        self.count = 0

    def __call__(self, *argv: str, ok: bool = True) -> bytes:
        self.count += 1
        done = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True,
                              timeout=STEP_TIMEOUT, check=False)
        if (done.returncode == 0) != ok:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            last = err[-1] if err else f"exit {done.returncode}"
            want = "" if ok else " (expected to fail)"
            raise StepFailed(f"step {self.count} `{' '.join(argv[:2])}`{want}: {last}")
        return done.stdout

    def write(self, name: str, data: bytes) -> None:
        (self.cwd / name).write_bytes(data)

    def read(self, name: str) -> bytes:
        return (self.cwd / name).read_bytes()


def _run(target: Target, body: Callable[[Steps], str]) -> Outcome:
    if shutil.which("tpm2_createprimary") is None:
        return Outcome("n/a", "tpm2-tools not installed")
    with tempfile.TemporaryDirectory(prefix="cusetpm-scn-") as tmp:
        steps = Steps(target, Path(tmp))
        try:
            detail = body(steps)
        except StepFailed as exc:
            return Outcome("fail", str(exc))
        except subprocess.TimeoutExpired as exc:
            return Outcome("fail", f"step {steps.count} timed out: {exc.cmd[0]}")
    return Outcome("pass", f"{steps.count} steps; {detail}" if detail else f"{steps.count} steps")


@scenario("tools", kernel_defined=True)
def tools_clear(target: Target, quick: bool) -> Outcome:
    """tpm2_clear (lockout auth), then tpm2_getcap handles-persistent is empty"""

    def body(run: Steps) -> str:
        run("tpm2_clear")
        listed = run("tpm2_getcap", "handles-persistent").strip()
        if listed not in (b"", b"[]"):
            raise StepFailed(f"persistent handles after clear: {listed!r}")
        return ""

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_seal_unseal_pcr(target: Target, quick: bool) -> Outcome:
    """seal to a PCR policy (createpolicy), unseal with -p pcr:; after a PCR extend unseal fails"""
    secret = b"sealed by the conformance run"

    def body(run: Steps) -> str:
        run.write("secret", secret)
        run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        run("tpm2_createpolicy", "--policy-pcr", "-l", "sha256:16", "-L", "pcr.policy")
        run("tpm2_create", "-C", "primary.ctx", "-L", "pcr.policy", "-i", "secret",
            "-u", "seal.pub", "-r", "seal.priv")
        run("tpm2_load", "-C", "primary.ctx", "-u", "seal.pub", "-r", "seal.priv",
            "-c", "seal.ctx")
        if run("tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:16") != secret:
            raise StepFailed("unsealed data differ")
        run("tpm2_pcrextend", "16:sha256=" + "11" * 32)
        run("tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:16", ok=False)
        run("tpm2_pcrreset", "16")
        return "unsealed; refused after extend"

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_persistent_parent(target: Target, quick: bool) -> Outcome:
    """a key hierarchy under a persistent parent: evictcontrol, create, load, sign, evict"""

    def body(run: Steps) -> str:
        run("tpm2_evictcontrol", "-C", "o", "-c", PERSISTENT, ok=False)  # absent after clear
        run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        run("tpm2_evictcontrol", "-C", "o", "-c", "primary.ctx", PERSISTENT)
        run("tpm2_create", "-C", PERSISTENT, "-G", "ecc", "-u", "key.pub", "-r", "key.priv")
        run("tpm2_load", "-C", PERSISTENT, "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
        run.write("message", b"signed under a persistent parent")
        run("tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig", "message")
        run("tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig", "-m", "message")
        run("tpm2_evictcontrol", "-C", "o", "-c", PERSISTENT)
        return ""

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_sign_verify(target: Target, quick: bool) -> Outcome:
    """createprimary, create, load, sign, verifysignature; a changed message fails to verify"""

    def body(run: Steps) -> str:
        run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        run("tpm2_create", "-C", "primary.ctx", "-G", "ecc", "-u", "key.pub", "-r", "key.priv")
        run("tpm2_load", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx")
        run.write("message", b"cusetpm conformance")
        run.write("other", b"cusetpm conformancE")
        run("tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig", "message")
        run("tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig", "-m", "message")
        run("tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig", "-m", "other",
            ok=False)
        return "verified; tampered message refused"

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_nv_define_write_read(target: Target, quick: bool) -> Outcome:
    """nvdefine, nvwrite, nvread (same bytes), nvundefine"""
    data = bytes(range(32))

    def body(run: Steps) -> str:
        run.write("data", data)
        run("tpm2_nvdefine", NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
        run("tpm2_nvwrite", NV_INDEX, "-C", "o", "-i", "data")
        got = run("tpm2_nvread", NV_INDEX, "-C", "o", "-s", "32")
        run("tpm2_nvundefine", NV_INDEX, "-C", "o")
        if got != data:
            raise StepFailed(f"nvread gave {got.hex()}")
        return ""

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_hmac_and_hash_sequences(target: Target, quick: bool) -> Outcome:
    """8 KiB through tpm2_hash and tpm2_hmac (sequence objects: Start/Update/Complete)"""
    data = os.urandom(8192)  # > MAX_DIGEST_BUFFER: the tools use a sequence

    def body(run: Steps) -> str:
        run.write("big", data)
        run("tpm2_hash", "-C", "o", "-g", "sha256", "-o", "digest", "big")
        if run.read("digest") != hashlib.sha256(data).digest():
            raise StepFailed("tpm2_hash digest differs from hashlib's")
        run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        run("tpm2_create", "-C", "primary.ctx", "-G", "hmac", "-u", "hmac.pub", "-r", "hmac.priv")
        run("tpm2_load", "-C", "primary.ctx", "-u", "hmac.pub", "-r", "hmac.priv",
            "-c", "hmac.ctx")
        one = run("tpm2_hmac", "-c", "hmac.ctx", "-g", "sha256", "big")
        two = run("tpm2_hmac", "-c", "hmac.ctx", "-g", "sha256", "big")
        if len(one) != 32 or one != two:
            raise StepFailed(f"hmac outputs {one.hex()} / {two.hex()}")
        return "hash = hashlib; hmac repeatable"

    return _run(target, body)


@scenario("tools", kernel_defined=False)
def tools_policy_session_resumed(target: Target, quick: bool) -> Outcome:
    """trial and policy sessions saved to files and resumed by the next process (PCR + authvalue)"""
    secret = b"needs a resumed policy session"

    def body(run: Steps) -> str:
        run.write("secret", secret)
        run("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        run("tpm2_startauthsession", "-S", "trial.ctx")
        run("tpm2_policypcr", "-S", "trial.ctx", "-l", "sha256:0,1")
        run("tpm2_policyauthvalue", "-S", "trial.ctx", "-L", "policy.dat")
        run("tpm2_flushcontext", "trial.ctx")
        run("tpm2_create", "-C", "primary.ctx", "-L", "policy.dat", "-p", "pw", "-i", "secret",
            "-u", "seal.pub", "-r", "seal.priv")
        run("tpm2_load", "-C", "primary.ctx", "-u", "seal.pub", "-r", "seal.priv",
            "-c", "seal.ctx")
        run("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
        run("tpm2_policypcr", "-S", "session.ctx", "-l", "sha256:0,1")
        run("tpm2_policyauthvalue", "-S", "session.ctx")
        if run("tpm2_unseal", "-c", "seal.ctx", "-p", "session:session.ctx+pw") != secret:
            raise StepFailed("unsealed data differ")
        run("tpm2_flushcontext", "session.ctx")
        return ""

    return _run(target, body)


@scenario("tools", kernel_defined=True)
def tools_nothing_left_behind(target: Target, quick: bool) -> Outcome:
    """after the tools above exited: no transient handles in a fresh space"""

    def body(run: Steps) -> str:
        listed = run("tpm2_getcap", "handles-transient").strip()
        if listed not in (b"", b"[]"):
            raise StepFailed(f"transient handles listed: {listed.decode()!r}")
        return ""

    return _run(target, body)
