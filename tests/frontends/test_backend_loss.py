"""swtpm killed under a serving daemon, and started again, through the FUSE node.

8 clients loop GetRandom and CreatePrimary on their own descriptors; swtpm is SIGKILLed. The
command in flight and every later one get EIO (never a hang, never a wrong answer), new opens
ENODEV, and the daemon stays up. A swtpm started again on the same state directory and socket
is found again (backoff from 0.1 s): opens work at once, a descriptor that held a key before
gets ENOENT for it, and the persistent key and NV index made before are still there.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cusetpm.backends.swtpm import SwtpmProcess
from tests.backends.conftest import needs_swtpm
from tests.frontends import tpmwire as W
from tests.frontends.conftest import Daemon
from tests.frontends.test_durability import _cmd, create_primary, evict_control, persistent_handles

pytestmark = [pytest.mark.swtpm, needs_swtpm]

CLIENTS = 8
PERSISTENT = 0x81000124
NV_INDEX = 0x01500124
NV_DATA = b"still here"
NV_ATTRS = 0x2 | 0x4 | 0x20000 | 0x40000 | 0x2000000  # ordinary, owner/auth rw, NO_DA


def xact(fd: int, command: bytes) -> bytes:
    os.write(fd, command)
    return os.read(fd, 4096)


def read_public(handle: int) -> bytes:
    return struct.pack(">HIII", 0x8001, 14, 0x173, handle)


def nv_define() -> bytes:
    public = struct.pack(">IHIHH", NV_INDEX, 0x000B, NV_ATTRS, 0, len(NV_DATA))
    return _cmd(0x12A, [0x40000001], struct.pack(">H", 0) + struct.pack(">H", len(public))
                + public)


def nv_write() -> bytes:
    return _cmd(0x137, [NV_INDEX, NV_INDEX], struct.pack(">H", len(NV_DATA)) + NV_DATA
                + struct.pack(">H", 0))


def nv_read() -> bytes:
    return _cmd(0x14E, [NV_INDEX, NV_INDEX], struct.pack(">HH", len(NV_DATA), 0))


@dataclass
class Looper:
    node: str
    ok: int = 0
    errors: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        fd = os.open(self.node, os.O_RDWR)
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    if i % 2:
                        r = xact(fd, W.get_random(16))
                        if W.rc(r) != 0 or len(r) != 10 + 2 + 16:
                            self.bad.append(f"GetRandom: rc {W.rc(r):#x}, {len(r)} bytes")
                    else:
                        r = xact(fd, create_primary())
                        if W.rc(r) != 0:
                            self.bad.append(f"CreatePrimary: rc {W.rc(r):#x}")
                            continue
                        r = xact(fd, W.flush_context(struct.unpack_from(">I", r, 10)[0]))
                        if W.rc(r) != 0:
                            self.bad.append(f"FlushContext: rc {W.rc(r):#x}")
                    self.ok += 1
                except OSError as exc:
                    self.errors.append(exc.errno or 0)
                    time.sleep(0.005)
        finally:
            os.close(fd)


def wait_for_open(node: str, within: float = 15.0) -> int:
    deadline = time.monotonic() + within
    while True:
        try:
            return os.open(node, os.O_RDWR)
        except OSError as exc:
            assert exc.errno == errno.ENODEV, exc
            assert time.monotonic() < deadline, "the daemon did not reconnect"
            time.sleep(0.02)


def test_swtpm_killed_under_the_node(make_daemon: type[Daemon], tmp_path: Path) -> None:
    sock = tmp_path / "swtpm.sock"
    swtpm = SwtpmProcess(tmp_path / "swtpm-state", transport="unix", socket_path=sock).start()
    daemon = make_daemon(extra=["--backend", f"swtpm:unix:{sock}"])
    try:
        daemon.start()
        node = daemon.node
        setup = os.open(node, os.O_RDWR)
        r = xact(setup, create_primary())
        assert W.rc(r) == 0
        key = struct.unpack_from(">I", r, 10)[0]
        assert W.rc(xact(setup, evict_control(key, PERSISTENT))) == 0
        assert W.rc(xact(setup, nv_define())) == 0
        assert W.rc(xact(setup, nv_write())) == 0
        old = os.open(node, os.O_RDWR)
        r = xact(old, create_primary())
        assert W.rc(r) == 0
        old_key = struct.unpack_from(">I", r, 10)[0]

        loopers = [Looper(node) for _ in range(CLIENTS)]
        threads = [threading.Thread(target=lp.run) for lp in loopers]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while min(lp.ok for lp in loopers) < 3:
            assert time.monotonic() < deadline, "the clients did not get going"
            time.sleep(0.01)
        swtpm.kill()
        swtpm.stop()
        deadline = time.monotonic() + 10
        while min(len(lp.errors) for lp in loopers) < 2:
            assert time.monotonic() < deadline, "a client hangs"
            time.sleep(0.01)
        with pytest.raises(OSError) as info:
            os.open(node, os.O_RDWR)
        assert info.value.errno == errno.ENODEV
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"

        swtpm = SwtpmProcess(tmp_path / "swtpm-state", transport="unix", socket_path=sock)
        swtpm.start()
        fresh = wait_for_open(node)
        for lp in loopers:
            lp.stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a client hangs"
        for lp in loopers:
            assert not lp.bad, lp.bad
            assert set(lp.errors) <= {errno.EIO}, lp.errors

        r = xact(fresh, create_primary())
        assert W.rc(r) == 0
        assert W.rc(xact(fresh, read_public(struct.unpack_from(">I", r, 10)[0]))) == 0
        r = xact(fresh, persistent_handles())
        assert W.rc(r) == 0 and struct.pack(">I", PERSISTENT) in r[15:]
        assert W.rc(xact(fresh, read_public(PERSISTENT))) == 0
        r = xact(fresh, nv_read())
        assert W.rc(r) == 0 and NV_DATA in r
        with pytest.raises(OSError) as info:
            xact(old, read_public(old_key))
        assert info.value.errno == errno.ENOENT
        assert W.rc(xact(old, W.get_random(8))) == 0
        assert W.rc(xact(fresh, evict_control(PERSISTENT, PERSISTENT))) == 0
        for fd in (setup, old, fresh):
            os.close(fd)
        log = daemon.log()
        assert "unreachable" in log and "is back after" in log and "restarted" in log, log
    finally:
        rc = daemon.stop()
        swtpm.stop()
    assert rc == 0, daemon.log()
