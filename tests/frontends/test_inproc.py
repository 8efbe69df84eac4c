"""Clients that vanish, and interrupted writes, checked by a census of the TPM itself.

The node is served by this test process, so the RM's census (what the TPM holds, not
what a space sees) is at hand; the clients are separate processes that get killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.frontends import tpmwire as wire
from tests.frontends.conftest import InProcessNode

EMPTY: dict[str, list[int]] = {"transient": [], "loaded_sessions": [], "saved_sessions": []}


def wait_for_empty_tpm(node: InProcessNode, timeout: float = 10.0) -> dict[str, list[int]]:
    """The release of a killed client's file arrives asynchronously: poll the census."""
    deadline = time.monotonic() + timeout
    while True:
        census: dict[str, list[int]] = node.rm.tpm_census()  # type: ignore[attr-defined]
        if census == EMPTY or time.monotonic() > deadline:
            return census
        time.sleep(0.05)


HOLDER = textwrap.dedent("""
    import sys, time
    from tpm2_pytss import ESAPI, TCTILdr, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SYM_DEF
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE

    esys = ESAPI(TCTILdr("device", sys.argv[1]))
    primary = esys.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER)[0]
    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits={"aes": 128}, mode={"aes": TPM2_ALG.CFB})
    sessions = [
        esys.start_auth_session(tpm_key=primary, bind=ESYS_TR.NONE, session_type=kind,
                                symmetric=sym, auth_hash=TPM2_ALG.SHA256)
        for kind in (TPM2_SE.HMAC, TPM2_SE.POLICY, TPM2_SE.HMAC)
    ]
    second = esys.create_primary(
        TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER)[0]
    print("holding", flush=True)
    time.sleep(60)
""")


def test_sigkilled_client_leaves_nothing(inproc: InProcessNode) -> None:
    pytest.importorskip("tpm2_pytss")
    assert inproc.rm.tpm_census() == EMPTY  # type: ignore[attr-defined]
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, inproc.path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "holding", proc.stderr.read() if proc.stderr else ""
        assert inproc.rm.open_spaces == 1  # type: ignore[attr-defined]
    finally:
        proc.kill()
        proc.wait()
    assert wait_for_empty_tpm(inproc) == EMPTY
    assert inproc.ops.open_files == 0  # type: ignore[attr-defined]
    assert inproc.rm.open_spaces == 0  # type: ignore[attr-defined]


KILLED_MID_COMMAND = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    command = bytes.fromhex(sys.argv[2])
    print("writing", flush=True)
    os.write(fd, command)  # blocking: the daemon answers when the TPM has
    print("unexpected: the write finished", flush=True)
""")


def test_client_killed_during_its_command_leaves_nothing(inproc: InProcessNode) -> None:
    """SIGKILL while a blocking write waits for RSA key generation: the key the TPM
    makes anyway is flushed when the file is released."""
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_MID_COMMAND, inproc.path,
             wire.create_primary_rsa(3072).hex()],
            stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        wait_blocked_in_write(f"/proc/{proc.pid}/syscall")  # the command is in flight
        proc.kill()
        proc.wait()
    assert wait_for_empty_tpm(inproc) == EMPTY
    assert inproc.ops.open_files == 0  # type: ignore[attr-defined]


def wait_blocked_in_write(syscall_file: str) -> None:
    """Until the thread sits in write(2) (x86-64 syscall 1: /proc/.../syscall shows it while
    it blocks), i.e. the node has the command and has not answered."""
    deadline = time.monotonic() + 30
    while not Path(syscall_file).read_text().startswith("1 "):
        assert time.monotonic() < deadline, "the client never blocked in write()"
        time.sleep(0.001)


def test_signal_during_blocking_write_cancels_the_command(inproc: InProcessNode) -> None:
    """A signal while the client waits in write(): FUSE_INTERRUPT -> rm.cancel(); the write
    completes with the TPM's answer (TPM_RC_CANCELED when the cancel landed in time)."""
    fd = os.open(inproc.path, os.O_RDWR)
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    codes = set()
    try:
        # Each attempt another key: a quick prime search must not simply repeat.
        for attempt in range(6):
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            assert os.write(fd, wire.create_primary_rsa(3072, unique=b"try%d" % attempt)) > 0
            response = os.read(fd, 4096)
            codes.add(wire.rc(response))
            if wire.rc(response) == 0:  # the key was ready before the signal
                os.write(fd, wire.flush_context(int.from_bytes(response[10:14], "big")))
                os.read(fd, 4096)
            else:  # no other answer than the key or the TPM's own cancel
                assert wire.rc(response) == wire.TPM_RC_CANCELED, hex(wire.rc(response))
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(fd)
    assert wire.TPM_RC_CANCELED in codes, [hex(c) for c in codes]
    assert wait_for_empty_tpm(inproc) == EMPTY


def test_release_while_nonblocking_command_runs(inproc: InProcessNode) -> None:
    """close() right after an O_NONBLOCK write: the space closes after the command."""
    for _ in range(3):
        fd = os.open(inproc.path, os.O_RDWR | os.O_NONBLOCK)
        os.write(fd, wire.create_primary_rsa(2048))
        os.close(fd)
    assert wait_for_empty_tpm(inproc) == EMPTY
