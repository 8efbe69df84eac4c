"""A blocked write on the FUSE node holds up no other descriptor's write.

A blocking write waits in the daemon until the TPM has answered. Unless the OPEN reply says
FOPEN_PARALLEL_DIRECT_WRITES (the shim adds it: libfuse 3.14 cannot), the kernel holds the
node's inode lock all that time, and every other descriptor's write waits in the kernel, unseen
by the RM. Here a CreatePrimary is held at the backend (a real libtpms behind a wrapper) for as
long as the test wants; meanwhile other descriptors' writes must reach the daemon: a malformed
one is answered EINVAL at once, a GetRandom joins the RM's queue behind the held command.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cusetpm.tpm.constants import TPM_CC
from tests.frontends import tpmwire as W
from tests.frontends.conftest import lazy_unmount, require_fuse
from tests.frontends.test_durability import create_primary
from tests.rm.faults import FaultyBackend

WAIT = 10.0  # only a failing run waits this long


@dataclass
class Node:
    path: str
    rm: object
    ops: object
    tpm: FaultyBackend


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    require_fuse()
    from cusetpm.backends.libtpms import LibtpmsBackend
    from cusetpm.frontends.files import TpmFileOps
    from cusetpm.frontends.native import NativeReplies, NodeSession
    from cusetpm.frontends.spec import NodeSpec
    from cusetpm.rm import ResourceManager

    mount = tmp_path / "mnt"
    mount.mkdir()
    backend = LibtpmsBackend(tmp_path / "state")
    tpm = FaultyBackend(backend)
    rm = ResourceManager(tpm)
    rm.start()
    ops = TpmFileOps(rm, NativeReplies())
    session = NodeSession(ops, NodeSpec(fuse_mount=str(mount), mode=0o666))
    try:
        session.start()
        yield Node(str(mount / "tpmrm0"), rm, ops, tpm)
    finally:
        session.stop()
        rm.stop()
        ops.abandon()
        session.destroy()
        backend.close()
        lazy_unmount(mount)


def xact(fd: int, command: bytes, out: list[bytes]) -> None:
    os.write(fd, command)
    out.append(os.read(fd, 4096))


def test_blocked_write_holds_up_no_other_descriptor(node: Node) -> None:
    fds = [os.open(node.path, os.O_RDWR) for _ in range(3)]
    mark = node.tpm.mark()
    gate = node.tpm.hold(TPM_CC.CreatePrimary)
    try:
        held: list[bytes] = []
        first = threading.Thread(target=xact, args=(fds[0], create_primary(), held))
        first.start()
        assert node.tpm.wait_started(TPM_CC.CreatePrimary, mark)
        # A malformed write is the daemon's to refuse: at once, if it reaches the daemon.
        refused: list[int] = []

        def malformed() -> None:
            try:
                os.write(fds[1], b"\x80\x01\x00\x00")
            except OSError as exc:
                refused.append(exc.errno or 0)

        second = threading.Thread(target=malformed)
        second.start()
        second.join(WAIT)
        assert not second.is_alive(), "the write waited for another descriptor's command"
        assert refused == [errno.EINVAL]
        # A command reaches the RM and queues behind the held one (one TPM).
        queued: list[bytes] = []
        third = threading.Thread(target=xact, args=(fds[2], W.get_random(8), queued))
        third.start()
        waiting = node.ops._waiting  # type: ignore[attr-defined]
        deadline = threading.Event()
        for _ in range(int(WAIT / 0.01)):
            if len(waiting) >= 2:
                break
            deadline.wait(0.01)
        assert len(waiting) == 2, "the second command did not reach the daemon"
        assert first.is_alive() and not held
        gate.set()
        for t in (first, third):
            t.join(WAIT)
            assert not t.is_alive()
        assert W.rc(held[0]) == 0 and W.rc(queued[0]) == 0
        assert struct.unpack_from(">I", queued[0], 2)[0] == 10 + 2 + 8
    finally:
        gate.set()  # a failing run must not leave the held write for the teardown
        for fd in fds:
            os.close(fd)


def test_the_node_reads_and_writes_as_before(node: Node) -> None:
    """FOPEN_STREAM (no file position) and a size of 4096 change nothing a client sees: many
    commands on one descriptor, partial reads, and a write beyond 4096 bytes is E2BIG."""
    fd = os.open(node.path, os.O_RDWR)
    try:
        for _ in range(200):  # far past 4096 bytes written and read at a position
            os.write(fd, W.get_random(32))
            response = os.read(fd, 4096)
            assert W.rc(response) == 0 and len(response) == 10 + 2 + 32
        os.write(fd, W.get_random(32))
        part = os.read(fd, 4)
        rest = os.read(fd, 4096)
        assert len(part) == 4 and len(part + rest) == 10 + 2 + 32
        with pytest.raises(OSError) as info:
            os.write(fd, W.get_random(8) + b"\0" * 5000)
        assert info.value.errno == errno.E2BIG
    finally:
        os.close(fd)
