"""The real programs at once: ten clients looping through one freshly served node for ~12 s.

Two each of tpm2-tools (createprimary/create/load/sign/verifysignature), a tpm2-tools
salted HMAC session used by the next tools, tpm2-pytss (tests/clients/pytss_worker.py)
and OpenSSL signing with a TPM key through tpm2-openssl; one each of clevis and
systemd-creds. Every run of every flow must succeed with a checked result; afterwards the
daemon is still serving, its log holds no traceback or error, and once every client is
gone the TPM holds no session and every object slot is free again.

Nothing here counts round trips or looks at the TPM while clients are open: how long
contexts stay loaded between commands is the RM's business, not this test's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.clients.tools import run, tpm_counts, wait_for_counts
from tests.frontends.conftest import REPO, Daemon

SECONDS = 12.0
MESSAGE = b"signed by one of many clients at once\n"
TPM = ["-provider", "tpm2", "-provider", "default"]


@dataclass
class Client:
    """One looping client: `setup` once, then `round` until the window closes."""

    name: str
    node: str
    cwd: Path

    @property
    def env(self) -> dict[str, str]:
        tcti = f"device:{self.node}"
        return {"TPM2TOOLS_TCTI": tcti, "TPM2OPENSSL_TCTI": tcti}

    def sh(self, *argv: str, input: bytes | None = None) -> bytes:
        return run(list(argv), self.cwd, self.env, input=input, timeout=60).stdout

    def setup(self) -> None:
        (self.cwd / "message").write_bytes(MESSAGE)

    def round(self, n: int) -> None:
        raise NotImplementedError


class ToolsSign(Client):
    def round(self, n: int) -> None:
        self.sh("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        self.sh("tpm2_create", "-Q", "-C", "primary.ctx", "-G", "ecc", "-u", "key.pub",
                "-r", "key.priv")
        self.sh("tpm2_load", "-Q", "-C", "primary.ctx", "-u", "key.pub", "-r", "key.priv",
                "-c", "key.ctx")
        self.sh("tpm2_sign", "-c", "key.ctx", "-g", "sha256", "-o", "sig", "message")
        self.sh("tpm2_verifysignature", "-c", "key.ctx", "-g", "sha256", "-s", "sig",
                "-m", "message")


class ToolsHmacSession(Client):
    """A salted HMAC session saved to a file by one tool and used by the next ones."""

    def round(self, n: int) -> None:
        self.sh("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc", "-c", "primary.ctx")
        self.sh("tpm2_startauthsession", "--hmac-session", "-c", "primary.ctx",
                "-S", "session.ctx")
        config = self.sh("tpm2_sessionconfig", "session.ctx")
        assert b"continuesession|decrypt|encrypt" in config, config
        random = self.sh("tpm2_getrandom", "-S", "session.ctx", "16")
        assert len(random) == 16
        self.sh("tpm2_create", "-Q", "-C", "primary.ctx", "-G", "ecc", "-u", "key.pub",
                "-r", "key.priv", "-P", "session:session.ctx")
        self.sh("tpm2_flushcontext", "session.ctx")


class Pytss(Client):
    """Loops in its own process (one Python start, a fresh ESAPI context per round)."""

    def loop(self, seconds: float) -> int:
        done = subprocess.run(
            [sys.executable, "-m", "tests.clients.pytss_worker", self.node, str(seconds)],
            cwd=REPO, capture_output=True, timeout=seconds + 60)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return int(done.stdout)


class OpensslSign(Client):
    def setup(self) -> None:
        super().setup()
        self.sh("openssl", "genpkey", *TPM, "-algorithm", "EC", "-pkeyopt", "group:P-256",
                "-out", "key.pem")
        assert b"TSS2 PRIVATE KEY" in (self.cwd / "key.pem").read_bytes()
        self.sh("openssl", "pkey", *TPM, "-in", "key.pem", "-pubout", "-out", "key.pub")
        (self.cwd / "digest").write_bytes(hashlib.sha256(MESSAGE).digest())

    def round(self, n: int) -> None:
        self.sh("openssl", "pkeyutl", *TPM, "-sign", "-inkey", "key.pem", "-in", "digest",
                "-pkeyopt", "digest:sha256", "-out", "sig")
        # Plain OpenSSL, no TPM: the signature is checked by something that is not us.
        out = self.sh("openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "key.pub",
                      "-in", "digest", "-sigfile", "sig", "-pkeyopt", "digest:sha256")
        assert b"Signature Verified Successfully" in out, out


class Clevis(Client):
    def round(self, n: int) -> None:
        secret = f"disk key {n} of {self.name}".encode()
        jwe = self.sh("clevis", "encrypt", "tpm2", "{}", input=secret)
        assert secret not in jwe
        assert self.sh("clevis", "decrypt", input=jwe) == secret


class SystemdCreds(Client):
    def round(self, n: int) -> None:
        secret = f"credential {n}".encode()
        (self.cwd / "plain").write_bytes(secret)
        # Bound to PCR 7 (the default), which no client here extends. (With an empty
        # --tpm2-pcrs=, systemd 252's decrypt refused the credential it had just made:
        # "TPM2 PCR bank invalid or not supported".)
        common = [f"--tpm2-device={self.node}", "--name=concurrent"]
        self.sh("systemd-creds", "encrypt", "--with-key=tpm2", *common, "plain", "cred")
        assert secret not in (self.cwd / "cred").read_bytes()
        assert self.sh("systemd-creds", "decrypt", *common, "cred", "-") == secret


CLIENTS: list[tuple[type[Client], int]] = [
    (ToolsSign, 2), (ToolsHmacSession, 2), (Pytss, 2), (OpensslSign, 2),
    (Clevis, 1), (SystemdCreds, 1),
]


def drive(client: Client, deadline: float) -> int:
    """The client's rounds until `deadline` (the round in flight finishes); how many."""
    if isinstance(client, Pytss):
        return client.loop(max(deadline - time.monotonic(), 0.0))
    client.setup()
    rounds = 0
    while time.monotonic() < deadline:
        client.round(rounds)
        rounds += 1
    return rounds


def test_real_clients_at_once(daemon: Daemon, tmp_path: Path) -> None:
    node = daemon.node
    empty = tpm_counts(node)
    assert empty["HR_LOADED"] == 0 and empty["HR_ACTIVE"] == 0, empty
    clients: list[Client] = []
    for kind, copies in CLIENTS:
        for i in range(copies):
            cwd = tmp_path / f"{kind.__name__}{i}"
            cwd.mkdir()
            clients.append(kind(f"{kind.__name__}{i}", node, cwd))
    assert len(clients) >= 8
    deadline = time.monotonic() + SECONDS
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = {c.name: pool.submit(drive, c, deadline) for c in clients}
        failures: dict[str, str] = {}
        rounds: dict[str, int] = {}
        for name, future in futures.items():
            try:
                rounds[name] = future.result(timeout=SECONDS + 120)
            except Exception as error:  # every client's failure is reported, not the first
                failures[name] = f"{type(error).__name__}: {error}"
    assert not failures, "\n".join(f"{n}: {e}" for n, e in failures.items())
    # Each client really ran (at least one full round) while the others did.
    assert all(n >= 1 for n in rounds.values()), rounds
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    log = daemon.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    # Every client has exited: the TPM is back where it started (no session, no object).
    after = wait_for_counts(node, empty)
    assert after == empty, f"TPM holds what no client owns: {after}, was {empty}"
    assert os.path.exists(node)
