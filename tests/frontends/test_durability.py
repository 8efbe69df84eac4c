"""Nothing acknowledged is lost when the daemon is SIGKILLed: NV counters and persistent keys.

A client loops NV_Increments and EvictControls (persist a new primary, or evict one) through
the FUSE node; the daemon is SIGKILLed after a seeded random number of acknowledged changes
(the next one is on its way), then restarted on the same state directory, 22 times. After
each restart: the counter is at least what the client saw succeed and at most what it tried
(never backwards), every persistent handle whose EvictControl was acknowledged is there and
every acknowledged eviction is gone.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.frontends.conftest import Daemon

SEED = 0xD0AB1E
ROUNDS = 22
NV_INDEX = 0x01500016
RH_OWNER = 0x40000001
RS_PW = 0x40000009
PERSISTENT_BASE = 0x81000100
# TPMA_NV: TPM_NT_COUNTER | OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD | NO_DA
COUNTER_ATTRS = 0x10 | 0x2 | 0x4 | 0x20000 | 0x40000 | 0x2000000


def _cmd(code: int, handles: list[int], params: bytes = b"", auth: bool = True) -> bytes:
    body = b"".join(struct.pack(">I", h) for h in handles)
    tag = 0x8001
    if auth:
        session = struct.pack(">IHBH", RS_PW, 0, 1, 0)
        body += struct.pack(">I", len(session)) + session
        tag = 0x8002
    body += params
    return struct.pack(">HII", tag, 10 + len(body), code) + body


def nv_define_counter() -> bytes:
    public = struct.pack(">IHIHH", NV_INDEX, 0x000B, COUNTER_ATTRS, 0, 8)
    return _cmd(0x12A, [RH_OWNER], struct.pack(">H", 0) + struct.pack(">H", len(public)) + public)


def nv_increment() -> bytes:
    return _cmd(0x134, [NV_INDEX, NV_INDEX])


def nv_read() -> bytes:
    return _cmd(0x14E, [NV_INDEX, NV_INDEX], struct.pack(">HH", 8, 0))


def create_primary() -> bytes:
    params = struct.pack(">HHHHHH", 0x0006, 128, 0x0043, 0x0010, 0x0003, 0x0010)
    public = struct.pack(">HHIH", 0x0023, 0x000B, 0x00030072, 0) + params + b"\0\0\0\0"
    body = struct.pack(">HHH", 4, 0, 0) + struct.pack(">H", len(public)) + public + b"\0" * 6
    return _cmd(0x131, [RH_OWNER], body)


def evict_control(handle: int, persistent: int) -> bytes:
    return _cmd(0x120, [RH_OWNER, handle], struct.pack(">I", persistent))


def persistent_handles() -> bytes:
    return _cmd(0x17A, [], struct.pack(">III", 1, 0x81000000, 64), auth=False)


def _rc(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 6)[0])


def _xact(fd: int, command: bytes) -> bytes:
    os.write(fd, command)
    return os.read(fd, 4096)


def read_state(node: str) -> tuple[int | None, set[int]]:
    """(counter value or None if never incremented, persistent handles)."""
    fd = os.open(node, os.O_RDWR)
    try:
        r = _xact(fd, nv_read())
        value = struct.unpack_from(">Q", r, 16)[0] if _rc(r) == 0 else None
        r = _xact(fd, persistent_handles())
        assert _rc(r) == 0, hex(_rc(r))
        count = struct.unpack_from(">I", r, 15)[0]
        handles = set(struct.unpack_from(f">{count}I", r, 19))
    finally:
        os.close(fd)
    return value, handles


@dataclass
class Ledger:
    """What the client saw acknowledged, and what it merely tried."""

    increments_acked: int = 0
    increments_tried: int = 0
    persisted: set[int] = field(default_factory=set)  # acknowledged, present
    evicted: set[int] = field(default_factory=set)  # acknowledged, gone
    in_doubt: set[int] = field(default_factory=set)  # its EvictControl was cut off
    acked: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)


def client_loop(node: str, rng: random.Random, ledger: Ledger, serial: list[int]) -> None:
    """Changes until the daemon dies under it."""
    try:
        fd = os.open(node, os.O_RDWR)
    except OSError:
        return
    try:
        while True:
            if rng.random() < 0.7 or not serial:
                ledger.increments_tried += 1
                r = _xact(fd, nv_increment())
                assert _rc(r) == 0, hex(_rc(r))
                ledger.increments_acked += 1
            elif ledger.persisted and rng.random() < 0.5:
                handle = rng.choice(sorted(ledger.persisted))
                ledger.in_doubt.add(handle)
                r = _xact(fd, evict_control(handle, handle))
                assert _rc(r) == 0, hex(_rc(r))
                ledger.persisted.discard(handle)
                ledger.in_doubt.discard(handle)
                ledger.evicted.add(handle)
            elif len(ledger.persisted) < 4:
                r = _xact(fd, create_primary())
                assert _rc(r) == 0, hex(_rc(r))
                handle = PERSISTENT_BASE + serial[0]
                serial[0] += 1
                ledger.in_doubt.add(handle)
                r = _xact(fd, evict_control(struct.unpack_from(">I", r, 10)[0], handle))
                assert _rc(r) == 0, hex(_rc(r))
                ledger.in_doubt.discard(handle)
                ledger.evicted.discard(handle)
                ledger.persisted.add(handle)
            with ledger.cond:
                ledger.acked += 1
                ledger.cond.notify_all()
    except OSError:
        pass  # the daemon was killed: the command in flight is in doubt
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the mount died with the daemon
            os.close(fd)
        with ledger.cond:
            ledger.acked = -1  # done
            ledger.cond.notify_all()


def test_acknowledged_changes_survive_sigkill(make_daemon: type[Daemon], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state, mount = tmp_path / "state", tmp_path / "mnt"
    ledger = Ledger()
    serial = [0]
    last_value = 0
    kills = 0
    for round_no in range(ROUNDS):
        daemon = make_daemon(state=state, mount=mount).start()
        value, handles = read_state(daemon.node)
        where = f"round {round_no} (seed {SEED:#x})"
        if round_no == 0:
            fd = os.open(daemon.node, os.O_RDWR)
            assert _rc(_xact(fd, nv_define_counter())) == 0
            os.close(fd)
        else:
            assert value is not None and value >= last_value, f"{where}: went back: {value}"
            assert value >= ledger.increments_acked, f"{where}: acknowledged increment lost"
            assert value <= ledger.increments_tried, f"{where}: more increments than tried"
            assert ledger.persisted <= handles, f"{where}: lost {ledger.persisted - handles}"
            assert not (ledger.evicted & handles), f"{where}: evicted {ledger.evicted & handles}"
            # what was in flight at the kill is settled now: the TPM's word decides
            ledger.persisted |= ledger.in_doubt & handles
            ledger.evicted |= ledger.in_doubt - handles
            ledger.persisted -= ledger.evicted
            ledger.in_doubt.clear()
            last_value = value
            ledger.increments_acked = ledger.increments_tried = value
        target = rng.randint(1, 12)
        with ledger.cond:
            ledger.acked = 0
        worker = threading.Thread(target=client_loop, args=(daemon.node, rng, ledger, serial))
        worker.start()
        with ledger.cond:
            ledger.cond.wait_for(lambda t=target: ledger.acked >= t or ledger.acked < 0, 60)
            assert ledger.acked >= target, f"{where}: the client stopped early"
        daemon.stop(signal.SIGKILL)
        kills += 1
        worker.join(60)
        assert not worker.is_alive()
    daemon = make_daemon(state=state, mount=mount).start()
    value, handles = read_state(daemon.node)
    assert value is not None and value >= ledger.increments_acked and value >= last_value
    assert ledger.persisted <= handles
    assert kills == ROUNDS
    # clean up the owner hierarchy's persistent handles for other users of the state: none
    daemon.stop()
