"""A machine with a hardware TPM: cusetpm over /dev/tpm0 beside the kernel's /dev/tpmrm0.

The chip is a kernel TPM chip on swtpm behind tpm_vtpm_proxy, which the kernel drives
like a discrete TPM.  In order (this module runs first in the guest session, see
conftest.py, so that no other chip holds the number 0):

1. ``--backend auto`` with no /dev/tpm0 serves the embedded libtpms;
2. with a chip as /dev/tpm0, ``--backend auto`` serves it (the serving line names it),
   with the defaults: resident contexts, one object and one session slot kept free;
3. clients on the kernel's /dev/tpmrm0 and on cusetpm's node, at the same time, on the
   same chip: loops of CreatePrimary/Sign/VerifySignature/FlushContext and policy
   session commands on both sides all succeed, and while cusetpm's clients hold their
   keys and sessions the chip still has the kept-free slots for the kernel's spaces;
4. a bind mount of cusetpm's node over /dev/tpmrm0 makes it the node clients find;
5. once cusetpm stops, the chip holds nothing of it (asked on /dev/tpm0 itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.guest import tpm_raw as raw
from tests.vm.guest.conftest import (
    CuseDaemon,
    TpmChip,
    chip_handles,
    make_vtpm_chip,
    start_cuse_daemon,
)

AUTO_NAME_WITHOUT, AUTO_NAME_WITH = "tpmrm46", "tpmrm47"
ROUNDS = 8  # per worker; a round is 10 client commands
WORKER_TIMEOUT = 600.0
# The defaults on a device backend (README: On a machine with a hardware TPM).
KEEP_FREE_OBJECTS = KEEP_FREE_SESSIONS = 1
# PolicyRestart then PolicyCommandCode(TPM_CC_Sign): policyDigest' = H(0^32 || CC || Sign).
EXPECTED_POLICY = hashlib.sha256(
    bytes(32) + struct.pack(">II", raw.TPM_CC_POLICY_COMMAND_CODE, raw.TPM_CC_SIGN)).digest()


def serving_line(daemon: CuseDaemon) -> str:
    lines = [line for line in daemon.output().splitlines() if line.startswith("cusetpm: serving")]
    assert len(lines) == 1, daemon.output()
    return lines[0]


def getrandom(node: str) -> bytes:
    return raw.parse_getrandom_response(raw.transact(node, raw.getrandom_command(8)))


def test_auto_without_dev_tpm0_serves_libtpms(tmp_path: Path, udev_isolated: list[str]) -> None:
    assert not os.path.exists("/dev/tpm0"), "a TPM chip exists already: this test must run first"
    daemon = start_cuse_daemon(AUTO_NAME_WITHOUT, tmp_path, backend="auto")
    try:
        line = serving_line(daemon)
        assert line.endswith(f" on libtpms:{daemon.state}"), line
        assert len(getrandom(daemon.path)) == 8
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.output()


# -- /dev/tpm0 and the kernel's /dev/tpmrm0 ------------------------------------------------


@dataclass
class Beside:
    chip: TpmChip
    daemon: CuseDaemon


@pytest.fixture(scope="module")
def tpm0(tmp_path_factory: pytest.TempPathFactory, udev_isolated: list[str]) -> Iterator[Beside]:
    """A chip as /dev/tpm0 (kernel RM /dev/tpmrm0) and `cusetpm serve --backend auto` on it."""
    base = tmp_path_factory.mktemp("tpm0")
    chip = make_vtpm_chip(base)
    try:
        assert chip.number == 0, f"the chip is {chip.tpm}, not /dev/tpm0 (another one exists)"
        daemon = start_cuse_daemon(AUTO_NAME_WITH, base, "--log-level", "INFO", backend="auto")
        beside = Beside(chip, daemon)
        try:
            yield beside
        finally:
            daemon.stop()
    finally:
        gone = chip.remove()
    assert gone, f"{chip.tpm} still there after swtpm stopped"


def test_auto_with_dev_tpm0_serves_the_kernels_chip(tpm0: Beside) -> None:
    line = serving_line(tpm0.daemon)
    assert line.endswith(" on device:/dev/tpm0"), line
    assert "--backend auto: device:/dev/tpm0" in tpm0.daemon.output()
    assert len(getrandom(tpm0.daemon.path)) == 8
    assert len(getrandom(tpm0.chip.tpmrm)) == 8  # the kernel's RM on the same chip


# -- both sides at once ---------------------------------------------------------------------


def _check(response: bytes, what: str) -> bytes:
    rc = raw.response_code(response)
    if rc != 0:
        raise AssertionError(f"{what}: rc {rc:#010x}")
    return response


def _sign_and_verify(fd: int, key: int, digest: bytes) -> bytes:
    signature = raw.parse_ecdsa_signature(raw.exchange(fd, raw.sign_command(key, digest)))
    _check(raw.exchange(fd, raw.verify_signature_command(key, digest, signature)),
           "VerifySignature")
    return signature


def _loop(node: str, label: str, hold_key: bool) -> Callable[[int, int], None]:
    """A client on one descriptor: a policy session (and, with hold_key, a signing key) held
    throughout; each round a new key is created, signs, is verified and flushed, the held
    key signs, and the held session's policy is rebuilt and read back."""

    def run(w: int, go: int) -> None:
        fd = os.open(node, os.O_RDWR)
        session = raw.started_session(raw.exchange(fd, raw.start_policy_session_command()))
        key = None
        if hold_key:
            key = raw.created_handle(raw.exchange(
                fd, raw.create_primary_ecc_signing_command(label.encode())))
        os.write(w, b"ready\n")
        os.read(go, 1)  # every worker starts its rounds at once
        started = time.monotonic()
        sample = None
        for i in range(ROUNDS):
            digest = hashlib.sha256(f"{label} round {i}".encode()).digest()
            # Each worker its own churn key: a signature made with another's would not verify.
            created = raw.exchange(
                fd, raw.create_primary_ecc_signing_command(f"{label} churn".encode()))
            churn = raw.created_handle(created)
            signature = _sign_and_verify(fd, churn, digest)
            _check(raw.exchange(fd, raw.flush_context_command(churn)), "FlushContext")
            if sample is None:
                x, y = raw.created_ecc_point(created)
                r, s = raw.ecdsa_r_s(signature)
                sample = {"x": x.hex(), "y": y.hex(), "digest": digest.hex(),
                          "r": f"{r:x}", "s": f"{s:x}"}
            if key is not None:
                _sign_and_verify(fd, key, digest)
            _check(raw.exchange(fd, raw.policy_restart_command(session)), "PolicyRestart")
            _check(raw.exchange(fd, raw.policy_command_code_command(session, raw.TPM_CC_SIGN)),
                   "PolicyCommandCode")
            policy = raw.parse_policy_digest(
                raw.exchange(fd, raw.policy_get_digest_command(session)))
            if policy != EXPECTED_POLICY:
                raise AssertionError(f"round {i}: policy digest {policy.hex()}")
        report = {"started": started, "ended": time.monotonic(), "sample": sample}
        os.write(w, f"done {json.dumps(report)}\n".encode())
        while True:  # keep the key, the session and the descriptor until killed
            time.sleep(60)

    return run


@dataclass
class Worker:
    label: str
    pid: int
    out: int
    lines: list[str] = field(default_factory=list)


def _spawn(label: str, child: Callable[[int, int], None], go: int) -> Worker:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the client: never returns into pytest (which runs no threads)
        try:
            os.close(r)
            child(w, go)
        except BaseException as e:
            with suppress(BaseException):
                os.write(w, f"error {e!r}\n".encode())
            os._exit(1)
        os._exit(0)
    os.close(w)
    return Worker(label, pid, r)


def _next_line(worker: Worker, deadline: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([worker.out], [], [], remaining)[0]:
            break
        chunk = os.read(worker.out, 1)
        if not chunk:
            break
        data += chunk
    line = data.decode(errors="replace").strip()
    worker.lines.append(line)
    return line


def _kill(workers: list[Worker]) -> None:
    for worker in workers:
        with suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(worker.pid, 0)
        with suppress(OSError):
            os.close(worker.out)


def _sample_verifies(sample: dict[str, str]) -> bool:
    """The TPM's signature checked without any TPM: ECDSA over the key CreatePrimary gave."""
    return raw.ecdsa_p256_verify(bytes.fromhex(sample["x"]), bytes.fromhex(sample["y"]),
                                 bytes.fromhex(sample["digest"]), int(sample["r"], 16),
                                 int(sample["s"], 16))


def _avail(node: str) -> dict[int, int]:
    response = raw.transact(node, raw.get_properties_command(raw.TPM_PT_HR_LOADED_AVAIL, 4))
    return raw.parse_properties(response)


def test_clients_of_both_at_once_on_one_chip(tpm0: Beside) -> None:
    """Two clients on cusetpm's node, each holding a key and a policy session, and two on
    the kernel's /dev/tpmrm0, each holding a policy session (a kernel space loads all its
    contexts for every command: one object and one session each, what the kept-free slots
    leave it), run their rounds at the same time; every command on both sides succeeds."""
    sides = [(tpm0.daemon.path, f"cusetpm-{n}", True) for n in range(2)]
    sides += [(tpm0.chip.tpmrm, f"kernel-{n}", False) for n in range(2)]
    go_r, go_w = os.pipe()
    workers = []
    try:
        for node, label, hold_key in sides:
            workers.append(_spawn(label, _loop(node, label, hold_key), go_r))
        deadline = time.monotonic() + WORKER_TIMEOUT
        for worker in workers:
            line = _next_line(worker, deadline)
            assert line == "ready", f"{worker.label} did not get going: {line!r}"
        os.write(go_w, b"g" * len(workers))
        reports = {}
        for worker in workers:
            line = _next_line(worker, deadline)
            assert line.startswith("done "), f"{worker.label}: {line!r}"
            reports[worker.label] = json.loads(line.removeprefix("done "))
        # They overlapped: each began its rounds before any of them had finished.
        last_start = max(r["started"] for r in reports.values())
        first_end = min(r["ended"] for r in reports.values())
        assert last_start < first_end, reports
        for label, report in reports.items():
            assert _sample_verifies(report["sample"]), f"{label}: {report['sample']}"
        # Everyone still holds their keys and sessions: the chip keeps the kernel's room.
        avail = _avail(tpm0.chip.tpmrm)
        assert avail[raw.TPM_PT_HR_TRANSIENT_AVAIL] >= KEEP_FREE_OBJECTS, avail
        assert avail[raw.TPM_PT_HR_LOADED_AVAIL] >= KEEP_FREE_SESSIONS, avail
        assert tpm0.daemon.alive(), tpm0.daemon.output()
    finally:
        _kill(workers)
        os.close(go_r)
        os.close(go_w)
    assert "Traceback" not in tpm0.daemon.output(), tpm0.daemon.output()


def test_bind_mount_makes_cusetpms_node_the_one_clients_find(tpm0: Beside) -> None:
    """`mount --bind NODE /dev/tpmrm0` (in a mount namespace of its own, so the guest's
    /dev stays as it is): /dev/tpmrm0 is then cusetpm's device, and tpm2-tools with no
    TCTI configured (tpm2-tss tries /dev/tpmrm0) gets its answer from cusetpm."""
    node = os.stat(tpm0.daemon.path).st_rdev
    script = (f"mount --bind {tpm0.daemon.path} /dev/tpmrm0 && stat -c '%t:%T' /dev/tpmrm0 "
              "&& tpm2_getrandom --hex 8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPM2TOOLS_")}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    rdev, random = done.stdout.split()
    assert rdev == f"{os.major(node):x}:{os.minor(node):x}", (rdev, node)
    assert len(random) == 16 and int(random, 16) >= 0
    # Outside that namespace the kernel's node is untouched.
    assert os.stat("/dev/tpmrm0").st_rdev != node


def test_stopped_cusetpm_leaves_nothing_in_the_chip(tpm0: Beside) -> None:
    """After a last client that holds a key and a session on cusetpm's node, cusetpm stops
    (SIGTERM, exit 0): asked on /dev/tpm0 itself, the chip holds no transient object and
    no loaded or saved session, and the kernel's /dev/tpmrm0 serves on."""
    fd = os.open(tpm0.daemon.path, os.O_RDWR)
    try:
        raw.created_handle(raw.exchange(fd, raw.create_primary_ecc_signing_command(b"last")))
        raw.started_session(raw.exchange(fd, raw.start_policy_session_command()))
        rc = tpm0.daemon.stop()
    finally:
        with suppress(OSError):
            os.close(fd)
    assert rc == 0, tpm0.daemon.output()
    assert not os.path.exists(tpm0.daemon.path)
    held = chip_handles(tpm0.chip.tpm)
    assert held == {"handles-transient": [], "handles-loaded-session": [],
                    "handles-saved-session": []}, held
    assert len(getrandom(tpm0.chip.tpmrm)) == 8
