"""A TPM that goes away and comes back, at the RM (a real swtpm on a unix socket).

swtpm killed while 8 clients loop: what was in flight or queued gets EIO (never a hang, never
a wrong answer), new spaces get ENODEV naming the backend; a swtpm restarted on the same state
directory is found again (backoff 0.1 s doubling); the TPM restart is seen (TPM2_ReadClock,
TPM2_Startup needed), so the old spaces' objects are ENOENT, their sessions the RM-layer
TPM_RC_REFERENCE_H0 and their saved-session tokens stale, while fresh spaces work at once and
a persistent key and an NV index made before are still there. A power cycle without the
process dying (swtpm CMD_INIT) is found the same way; a dropped connection to a swtpm that
did not restart loses nothing.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cusetpm.backends.swtpm import CMD_INIT, SwtpmBackend, SwtpmProcess
from cusetpm.rm import ResourceManager, RMConfig, RMError
from cusetpm.rm.continuation import RC_STALE_TOKEN
from cusetpm.tpm import commands as build
from cusetpm.tpm.constants import TPM_CC, TPM_RH, TPM_SE
from cusetpm.tpm.rc import TPM_RC, rm_rc
from tests.backends.conftest import needs_swtpm
from tests.rm.client import (
    RawClient,
    pw_session,
    raw_command,
    rc_of,
    tpm2b_of,
)
from tests.rm.conftest import assert_tpm_empty

pytestmark = [pytest.mark.swtpm, needs_swtpm]

PERSISTENT = 0x81000123
NV_INDEX = 0x01500123
NV_DATA = b"kept over a TPM restart"
# TPMA_NV: ORDINARY | OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD | NO_DA
NV_ATTRS = 0x2 | 0x4 | 0x20000 | 0x40000 | 0x2000000
CLIENTS = 8


@dataclass
class Tpm:
    """A swtpm whose process can die and come back on the same state and socket."""

    state: Path
    socket: Path
    proc: SwtpmProcess | None = None

    def start(self) -> None:
        self.proc = SwtpmProcess(self.state, transport="unix", socket_path=self.socket).start()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()
        self.proc = None


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[Tpm]:
    t = Tpm(tmp_path / "state", tmp_path / "swtpm.sock")
    t.start()
    yield t
    if t.proc is not None:
        t.proc.stop()


@pytest.fixture
def rm(tpm: Tpm) -> Iterator[ResourceManager]:
    backend = SwtpmBackend.unix(tpm.socket, startup=False)  # the RM starts the TPM
    manager = ResourceManager(backend, RMConfig(reopen_first_delay=0.05, reopen_max_delay=0.4))
    manager.start()
    yield manager
    manager.stop()
    backend.close()


def new_client(rm: ResourceManager) -> RawClient:
    return RawClient(rm, rm.open_space())


def make_persistent_and_nv(c: RawClient) -> None:
    key = c.create_primary()
    evict = raw_command(TPM_CC.EvictControl, [TPM_RH.OWNER, key], struct.pack(">I", PERSISTENT),
                        pw_session())
    assert rc_of(c.send(evict)) == 0
    public = struct.pack(">IHIHH", NV_INDEX, 0x000B, NV_ATTRS, 0, len(NV_DATA))
    define = raw_command(TPM_CC.NV_DefineSpace, [TPM_RH.OWNER],
                         tpm2b_of(b"") + tpm2b_of(public), pw_session())
    assert rc_of(c.send(define)) == 0
    write = raw_command(TPM_CC.NV_Write, [NV_INDEX, NV_INDEX],
                        tpm2b_of(NV_DATA) + struct.pack(">H", 0), pw_session())
    assert rc_of(c.send(write)) == 0


def assert_persistent_and_nv(c: RawClient) -> None:
    assert PERSISTENT in c.handles(0x81000000)[1]
    c.read_public(PERSISTENT)
    read = raw_command(TPM_CC.NV_Read, [NV_INDEX, NV_INDEX],
                       struct.pack(">HH", len(NV_DATA), 0), pw_session())
    response = c.send(read)
    assert rc_of(response) == 0
    assert NV_DATA in response


def wait_until_up(rm: ResourceManager, within: float = 10.0) -> RawClient:
    """The first space the RM lets open again; ENODEV until then."""
    deadline = time.monotonic() + within
    while True:
        try:
            return new_client(rm)
        except RMError as exc:
            assert exc.errno == errno.ENODEV, exc
            assert time.monotonic() < deadline, "the RM did not reconnect"
            time.sleep(0.02)


@dataclass
class Looper:
    """A client looping CreatePrimary / GetRandom in its own space until told to stop."""

    client: RawClient
    ok: int = 0
    errors: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if i % 2:
                    data = self.client.get_random(16)
                    if len(data) != 16:
                        self.bad.append(f"GetRandom gave {len(data)} bytes")
                else:
                    handle = self.client.create_primary()
                    self.client.flush(handle)
                self.ok += 1
            except RMError as exc:
                self.errors.append(exc.errno or 0)
            except Exception as exc:  # a wrong answer: a TPM error where success was due
                self.bad.append(repr(exc))


def test_swtpm_killed_and_restarted(tpm: Tpm, rm: ResourceManager) -> None:
    setup = new_client(rm)
    make_persistent_and_nv(setup)
    old = new_client(rm)
    key = old.create_primary()
    session = old.start_session(TPM_SE.POLICY)
    parked = old.start_session(TPM_SE.HMAC)
    token = old.context_save(parked)
    loopers = [Looper(new_client(rm)) for _ in range(CLIENTS)]
    threads = [threading.Thread(target=lp.run) for lp in loopers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while min(lp.ok for lp in loopers) < 3:
        assert time.monotonic() < deadline, "the clients did not get going"
        time.sleep(0.01)
    tpm.kill()
    deadline = time.monotonic() + 10
    while min(len(lp.errors) for lp in loopers) < 3:  # every client sees the outage
        assert time.monotonic() < deadline, "a client hangs"
        time.sleep(0.01)
    assert rm.backend_state.down
    with pytest.raises(RMError) as info:
        rm.open_space()
    assert info.value.errno == errno.ENODEV
    assert "swtpm:unix:" in str(info.value)
    tpm.start()
    fresh = wait_until_up(rm)
    for lp in loopers:
        lp.stop.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a client hangs"
    for lp in loopers:
        assert not lp.bad, lp.bad
        assert set(lp.errors) <= {errno.EIO}, lp.errors
    stats = rm.backend_state.stats
    assert (stats.outages, stats.reconnects, stats.restarts) == (1, 1, 1), stats
    # fresh spaces at once; what the TPM keeps in NV is there
    fresh_key = fresh.create_primary()
    fresh.read_public(fresh_key)
    assert rc_of(fresh.send(build.flush_context(fresh.start_session(TPM_SE.POLICY)))) == 0
    assert_persistent_and_nv(fresh)
    # the old space: documented codes, not the TPM's integrity failure
    with pytest.raises(RMError) as info:
        old.read_public(key)
    assert info.value.errno == errno.ENOENT
    restart = raw_command(TPM_CC.PolicyRestart, [session])
    assert rc_of(old.send(restart)) == rm_rc(TPM_RC.REFERENCE_H0)
    assert rc_of(old.send(build.context_load_raw(token))) == RC_STALE_TOKEN
    new_key = old.create_primary()  # the space itself goes on working
    assert new_key != key
    old.read_public(new_key)
    for lp in loopers:
        lp.client.get_random(8)  # so do the loopers'
        rm.close_space(lp.client.space)
    for c in (setup, old, fresh):
        rm.close_space(c.space)
    assert_tpm_empty(rm)
    evict = raw_command(TPM_CC.EvictControl, [TPM_RH.OWNER, PERSISTENT],
                        struct.pack(">I", PERSISTENT), pw_session())
    cleanup = new_client(rm)
    assert rc_of(cleanup.send(evict)) == 0


def test_power_cycle_without_exit(rm: ResourceManager) -> None:
    """swtpm CMD_INIT: same process, the TPM waits for Startup. The next command that finds
    it gets EIO; the RM starts the TPM and finds the contexts it held lost."""
    old = new_client(rm)
    key = old.create_primary()
    backend = rm.backend
    assert isinstance(backend, SwtpmBackend)
    backend.control(CMD_INIT, struct.pack(">I", 0))
    with pytest.raises(RMError) as info:
        old.get_random(8)
    assert info.value.errno == errno.EIO
    assert not rm.backend_state.down
    assert rm.backend_state.stats.restarts == 1
    assert len(old.get_random(8)) == 8
    with pytest.raises(RMError) as info:
        old.read_public(key)
    assert info.value.errno == errno.ENOENT
    fresh = new_client(rm)
    fresh.read_public(fresh.create_primary())
    for c in (old, fresh):
        rm.close_space(c.space)
    assert_tpm_empty(rm)


def test_dropped_connection_loses_nothing(rm: ResourceManager) -> None:
    """The data connection goes (closed on our side; swtpm lives on): at most the command
    that finds it gets EIO, the RM reconnects at once, sees no restart, keeps everything."""
    a = new_client(rm)
    key = a.create_primary()
    session = a.start_session(TPM_SE.POLICY)
    backend = rm.backend
    assert isinstance(backend, SwtpmBackend) and backend._sock is not None
    backend._sock.shutdown(2)  # SHUT_RDWR: the socket reads EOF from now on
    with pytest.raises(RMError) as info:
        a.get_random(8)
    assert info.value.errno == errno.EIO
    assert not rm.backend_state.down
    assert rm.backend_state.stats.restarts == 0
    a.read_public(key)
    assert rc_of(a.send(raw_command(TPM_CC.PolicyRestart, [session]))) == 0
    rm.close_space(a.space)
    assert_tpm_empty(rm)
