"""Fair scheduling through the node, with real tpm2-tss clients.

tpm2-tss's device TCTI sends a GetRandom when it opens the node and waits for the answer
at most one second (a hard-coded poll). Behind a queue of RSA key generations, in arrival
order, that open fails ("Failed to poll for response"); the fair schedule runs the quick
command after at most the one in flight. (On a FUSE node whose kernel holds the inode lock
through a blocking write, the writes also wait for each other there; measured here, the 50
opens took 4 s fair and 16 s fifo with 8 key generation loops.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

KEYGEN_LOOPS = 4
OPENS = 50


def test_fresh_opens_while_rsa_keys_are_generated(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("tpm2_createprimary") is None:
        pytest.fail("tpm2-tools is missing: the Makefile installs it")
    daemon = make_daemon().start()
    env = {**os.environ, "TPM2TOOLS_TCTI": daemon.tcti}
    stop = threading.Event()
    keygens: list[int] = []
    lock = threading.Lock()

    def keygen_loop(n: int) -> None:
        while not stop.is_set():
            done = subprocess.run(
                ["tpm2_createprimary", "-C", "o", "-G", "rsa2048", "-c", str(tmp_path / f"k{n}")],
                env=env, capture_output=True, timeout=120,
            )
            assert done.returncode == 0, done.stderr
            with lock:
                keygens.append(n)

    loops = [threading.Thread(target=keygen_loop, args=(n,)) for n in range(KEYGEN_LOOPS)]
    for t in loops:
        t.start()
    failures: list[str] = []
    try:
        while True:  # the TPM is busy with key generation before the first open
            with lock:
                if len(keygens) >= KEYGEN_LOOPS:
                    break
            threading.Event().wait(0.05)
        for _ in range(OPENS):
            done = subprocess.run(
                ["tpm2_getrandom", "8", "--hex"], env=env, capture_output=True, timeout=60
            )
            if done.returncode != 0 or len(done.stdout.strip()) != 16:
                failures.append(done.stderr.decode())
    finally:
        stop.set()
        for t in loops:
            t.join()
    assert not failures, f"{len(failures)} of {OPENS} opens failed: {failures[:3]}"
    with lock:
        assert len(keygens) >= 2 * KEYGEN_LOOPS  # the key generations kept running meanwhile
    assert "Traceback" not in daemon.log()
