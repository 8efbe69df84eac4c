"""`make fuzz`: a million hostile commands through the FUSE node from several processes, in
each residency mode of the RM (resident: contexts stay in the TPM between commands; eager:
everything put away after each command).

The node is served in this process (libtpms, the RM, TpmFileOps, the libfuse session) so the
driver can look behind it: a guard wraps the real backend and checks every client command
that reaches the TPM. First, real traffic is captured as clients send it through the node: a
tpm2-tools flow and tpm2-pytss ESAPI flows (primary, create/load/sign, a salted HMAC session
with parameter encryption, a policy session, NV define/write/read, ContextSave/Load). Client
processes (forkserver: clean of this process's threads) each open the node, make a few real
objects and sessions, then send commands from tests/rm/test_fuzz.py's generators (random,
structured, valid, mutated) and mutations of the captured traffic: bit flips, truncations,
commandSize, authorizationSize and TPM2B sizes lying, handle areas and auth sessions naming
other spaces' virtual handles, sessions other clients hold now and guessed session or
physical handles, garbage auth areas, huge counts, and replays rebased onto the client's own
handles so they reach the TPM. Interleaved: reopens, O_NONBLOCK writes never read, closes
with a command in flight, and the driver SIGKILLs clients at random.

Checks, continuously: a probe client's GetRandom is answered within PROBE_BOUND; the guard
counts client commands naming a virtual handle the RM did not map, a physical object not
loaded for the running space, or a session it does not own (must stay 0); daemon RSS
sampled; every CENSUS_EVERY seconds, with spaces open, what the TPM holds is in the RM's
tables (residency, sessions) or was there before us (eager: nothing loaded at all). After
each phase (every client gone, the probe paused): the TPM holds nothing of ours but the
sessions clients saved and left for continuation, which the RM tracks; once those are
dropped, nothing. Writes bench/results/fuzz.{json,md}.

Run: python -m bench.fuzz [--commands 1000000 (per mode)] [--residency both|resident|eager]
     [--clients 4] [--phase 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.scenarios import wire
from cusetpm.backends.base import Backend
from cusetpm.tpm.command import parse_command
from cusetpm.tpm.constants import (
    TPM_CC,
    TPM_HT,
    TPM_RS_PW,
    command_name,
    is_session_handle,
    is_transient_handle,
)
from cusetpm.tpm.errors import TPMParseError

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_BOUND = 5.0  # seconds: a probe answered later than this is a finding
PROBE_EVERY = 0.2
RSS_BOUND_KIB = 256 * 1024
# Errnos a hostile command may earn through the node (the kernel's, and the RM's refusals).
ALLOWED = {errno.EINVAL, errno.ENOENT, errno.EFAULT, errno.E2BIG}
# The RM's own conversation with the TPM (swap, census): not client commands.
RM_OWN = {TPM_CC.ContextLoad, TPM_CC.ContextSave, TPM_CC.FlushContext, TPM_CC.GetCapability}
PHYSICAL_TRANSIENT_END = 0x80FF0000  # libtpms hands out 0x80000000..; virtual: 0x80FFFFFF..


class GuardBackend(Backend):
    """The real backend, with a check of what reaches it on behalf of a client."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = f"guard:{inner.name}"
        self.rm: Any = None
        self.checked = 0
        self.violations: list[str] = []
        # The space each physical transient handle was loaded or created for (None: the
        # RM's own), learnt from the responses: a client command naming a physical handle
        # of someone else's object must never reach the TPM, resident contexts or not.
        self.owners: dict[int, Any] = {}

    def transmit(self, command: bytes) -> bytes:
        self._check(command)
        response = self.inner.transmit(command)
        self._learn(command, response)
        return response

    def _learn(self, command: bytes, response: bytes) -> None:
        rm = self.rm
        if rm is None or rm._executor is None or len(command) < 14 or len(response) < 14 \
                or response[6:10] != bytes(4):
            return
        code = int.from_bytes(command[6:10], "big")
        if code == TPM_CC.FlushContext:
            self.owners.pop(int.from_bytes(command[10:14], "big"), None)
            return
        attrs = rm._executor.table.lookup(code)
        handle = int.from_bytes(response[10:14], "big")
        if attrs is not None and attrs.rHandle and is_transient_handle(handle):
            job = rm._current
            self.owners[handle] = job.space if job is not None and job.is_command else None

    def _check(self, command: bytes) -> None:
        rm = self.rm
        if rm is None or rm._executor is None or len(command) < 10:
            return
        code = int.from_bytes(command[6:10], "big")
        if code in RM_OWN:
            return
        attrs = rm._executor.table.lookup(code)
        job = rm._current
        if attrs is None or job is None or not job.is_command:
            return
        try:
            cmd = parse_command(command, attrs.cHandles)
        except TPMParseError:
            return
        self.checked += 1
        space = job.space
        for h in cmd.handles:
            if is_transient_handle(h) and h >= PHYSICAL_TRANSIENT_END:
                self.violations.append(f"unmapped transient 0x{h:08x}: {command.hex()}")
            elif is_transient_handle(h) and self.owners.get(h) is not space:
                self.violations.append(f"object 0x{h:08x} not loaded for space {space.id}: "
                                       f"{command.hex()}")
            if is_session_handle(h) and h not in space.sessions:
                self.violations.append(f"foreign session 0x{h:08x}: {command.hex()}")
        for s in cmd.sessions:
            h = s.sessionHandle
            if h != TPM_RS_PW and is_session_handle(h) and h not in space.sessions:
                self.violations.append(f"foreign auth session 0x{h:08x}: {command.hex()}")

    def cancel(self) -> None:
        self.inner.cancel()

    def close(self) -> None:
        self.inner.close()


# -- client processes --------------------------------------------------------------------


def _xact(fd: int, command: bytes) -> bytes:
    os.write(fd, command)
    return os.read(fd, 8192)


# Clients report on a shared board without locks: each writes only its own row (commands
# sent, then a count per errno), so a client SIGKILLed mid-update holds no lock and loses
# nothing it had reported; findings go to a file of its own, one line each, as they happen.
CLIENT_SLOTS = 1024
ERRNO_COLS = 160
ROW = 1 + ERRNO_COLS


@dataclass
class ClientStats:
    sent: int = 0
    answered: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    board: Any = None
    row: int = 0
    findings_file: str | None = None

    def finding(self, text: str) -> None:
        if len(self.findings) >= 20:
            return
        self.findings.append(text)
        if self.findings_file is not None:
            fd = os.open(self.findings_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, text.encode() + b"\n")
            finally:
                os.close(fd)

    def publish(self) -> None:
        if self.board is None:
            return
        at = self.row * ROW
        for code, count in self.refused.items():
            self.board[at + 1 + min(code, ERRNO_COLS - 1)] = count
        self.board[at] = self.sent


def board_sent(board: Any) -> int:
    return sum(board[i * ROW] for i in range(CLIENT_SLOTS))


def board_errnos(board: Any) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i in range(CLIENT_SLOTS):
        for code in range(ERRNO_COLS):
            n = board[i * ROW + 1 + code]
            if n:
                counts[code] = counts.get(code, 0) + n
    return counts


def _node_fuzzer(rng: random.Random, fd: int) -> Any:
    from cusetpm.rm.commandtable import CommandTable
    from tests.rm.test_fuzz import Fuzzer

    fz = Fuzzer.__new__(Fuzzer)  # the generators only: sending goes through the node here
    fz.rng = rng
    fz.table = CommandTable.read(lambda c: _xact(fd, c))
    return fz


def _setup_space(fd: int, rng: random.Random) -> Any:
    from tests.rm.test_fuzz import FuzzSpace

    space = FuzzSpace(client=None)  # type: ignore[arg-type]
    r = _xact(fd, wire.create_primary_ecc())
    if wire.rc(r) == 0:
        space.objects.append(wire.handle(r))
        saved = _xact(fd, wire.context_save(wire.handle(r)))
        if wire.rc(saved) == 0:
            space.blobs.append(wire.parameters(saved))
    for kind in (wire.SE_POLICY, wire.SE_HMAC):
        r = _xact(fd, wire.start_auth_session(kind))
        if wire.rc(r) == 0:
            space.sessions.append(wire.handle(r))
    return space


# Where the TPM hands out what a guess may hit: session slots, physical transient handles.
GUESSED_SESSIONS = [kind | slot for kind in (0x02000000, 0x03000000) for slot in range(64)]
GUESSED_TRANSIENT = [0x80000000 + i for i in range(16)] + [0x81000000 + i for i in range(4)]
OTHERS_PER_CLIENT = 4  # session handles each client publishes for the others to aim at
OTHERS_SLOTS = 16


@dataclass
class Layout:
    """Where a captured command's areas start (from the TPM's cHandles for its code)."""

    handles: list[int]  # offsets of the handle slots
    auth: int | None  # offset of authorizationSize (TPM_ST_SESSIONS commands)
    params: int  # offset of the parameter area


def layout(base: bytes | bytearray, table: Any) -> Layout:
    code = int.from_bytes(base[6:10], "big") if len(base) >= 10 else 0
    attrs = table.lookup(code) if table is not None else None
    count = attrs.cHandles if attrs is not None else 0
    slots = [10 + 4 * i for i in range(count) if 14 + 4 * i <= len(base)]
    end = 10 + 4 * count
    if base[:2] == b"\x80\x02" and len(base) >= end + 4:
        size = int.from_bytes(base[end:end + 4], "big")
        return Layout(slots, end, min(len(base), end + 4 + size))
    return Layout(slots, None, min(len(base), end))


def auth_sessions(base: bytes | bytearray, at: int) -> list[int]:
    """Offsets of the session handles in the authorization area at `at`."""
    end = min(len(base), at + 4 + int.from_bytes(base[at:at + 4], "big"))
    offsets, i = [], at + 4
    while i + 4 <= end:
        offsets.append(i)
        i += 4
        if i + 2 > end:
            break
        i += 2 + int.from_bytes(base[i:i + 2], "big") + 1  # nonce, attributes
        if i + 2 > end:
            break
        i += 2 + int.from_bytes(base[i:i + 2], "big")  # hmac
    return offsets


def foreign_handle(rng: random.Random, space: Any, others: Any) -> int:
    """A handle the space does not own: another space's virtual handle (the numbers past its
    own), a session another client holds now, a guessed session or physical handle."""
    r = rng.random()
    published = [h for h in (others or []) if h and h not in space.sessions]
    if r < 0.3:
        return 0x80FFFFFF - len(space.objects) - rng.randrange(8)
    if r < 0.55 and published:
        return int(rng.choice(published))
    if r < 0.85:
        return rng.choice(GUESSED_SESSIONS)
    return rng.choice(GUESSED_TRANSIENT)


def own_handle(rng: random.Random, space: Any, transient: bool) -> int | None:
    pool = space.objects if transient else space.sessions
    return rng.choice(pool) if pool else None


def rebase(rng: random.Random, base: bytearray, lay: Layout, space: Any) -> None:
    """The captured command's handles and sessions replaced by the space's own, so it gets
    past the ownership check and the TPM sees the real traffic's parameters."""
    for at in lay.handles:
        h = int.from_bytes(base[at:at + 4], "big")
        mine = own_handle(rng, space, transient=is_transient_handle(h)) \
            if is_transient_handle(h) or is_session_handle(h) else None
        if mine is not None:
            struct.pack_into(">I", base, at, mine)
    if lay.auth is not None:
        for at in auth_sessions(base, lay.auth):
            if is_session_handle(int.from_bytes(base[at:at + 4], "big")):
                mine = own_handle(rng, space, transient=False)
                struct.pack_into(">I", base, at, mine if mine is not None else TPM_RS_PW)


def _mutate_captured(rng: random.Random, captured: list[bytes], space: Any, table: Any = None,
                     others: Any = None) -> bytes:
    original = rng.choice(captured)
    base = bytearray(original)
    lay = layout(base, table)
    how = rng.randrange(12)
    if how == 0:  # bit flips
        for _ in range(rng.choice([1, 1, 2, 3])):
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
    elif how == 1:  # truncated
        base = base[: rng.randrange(len(base))]
    elif how == 2:  # commandSize lying
        struct.pack_into(">I", base, 2, rng.choice([0, 9, len(base) - 1, len(base) + 1,
                                                    rng.getrandbits(32)]))
    elif how == 3 and len(base) >= 14:  # a handle slot naming someone else's handle
        at = rng.choice(lay.handles) if lay.handles else 10
        struct.pack_into(">I", base, at, foreign_handle(rng, space, others))
    elif how == 4 and lay.auth is not None:  # garbage in the auth area, its size kept
        start = lay.auth + 4
        base[start:lay.params] = rng.randbytes(lay.params - start)
    elif how == 5 and lay.auth is not None:  # authorizationSize lying
        size = int.from_bytes(base[lay.auth:lay.auth + 4], "big")
        struct.pack_into(">I", base, lay.auth, rng.choice(
            [0, 1, 8, size - 1, size + 1, len(base), 0xFFFFFFFF, rng.getrandbits(32)]) & 0xFFFFFFFF)
    elif how == 6 and lay.auth is not None:  # an auth session someone else holds or guessed
        slots = auth_sessions(base, lay.auth)
        if slots:
            r = rng.random()
            h = (foreign_handle(rng, space, others) if r < 0.7 else
                 own_handle(rng, space, transient=True) or TPM_RS_PW)  # an object as a session
            struct.pack_into(">I", base, rng.choice(slots), h)
    elif how == 7 and lay.params + 2 <= len(base):  # a TPM2B size in the parameters lying
        at = rng.randrange(lay.params, len(base) - 1)
        value = int.from_bytes(base[at:at + 2], "big")
        struct.pack_into(">H", base, at, rng.choice([0, 1, 0xFFFF, 0x8000, value + 1, value - 1])
                         & 0xFFFF)
    elif how == 8:  # huge counts: a u32 in the parameters (TPML counts, sizes) at its maximum
        if lay.params + 4 <= len(base):
            at = rng.randrange(lay.params, len(base) - 3)
            struct.pack_into(">I", base, at, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 254]))
        elif lay.auth is not None:  # or an auth area claiming sessions far past the command
            struct.pack_into(">I", base, lay.auth, 0xFFFFFFF0)
    elif how == 9:  # own handles, as a client replaying the flow would: reaches the TPM
        rebase(rng, base, lay, space)
        if rng.random() < 0.5 and lay.params < len(base):
            base[rng.randrange(lay.params, len(base))] ^= 1 << rng.randrange(8)
    elif how == 10:  # junk appended, header size fixed up
        base += rng.randbytes(rng.randint(1, 64))
        struct.pack_into(">I", base, 2, len(base))
    else:  # replayed as captured: the capturing space's handles, stale or someone else's now
        pass
    if len(base) >= 10 and _dangerous(int.from_bytes(base[6:10], "big"), original):
        return bytes(base[:9])  # as tests/rm/test_fuzz.py: never a plausible dangerous command
    return bytes(base)


def _dangerous(code: int, original: bytes) -> bool:
    """A code the TPM would obey to everyone's loss (Clear, Shutdown, ...: DANGEROUS). NV
    commands of the captured flows keep their code: their index is the flow's own."""
    from tests.rm.test_fuzz import DANGEROUS

    if code not in DANGEROUS:
        return False
    same = code == int.from_bytes(original[6:10], "big")
    return not (same and TPM_CC(code).name.startswith("NV_"))


def _huge(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return wire.get_capability(rng.choice([0, 1, 2, 5, 6, 8]), rng.getrandbits(32),
                                   0xFFFFFFFF)
    return wire.get_random(rng.choice([0xFFFF, 4096, 1025]))


def _send(fd: int, command: bytes, stats: ClientStats) -> bytes | None:
    if not command:
        return None  # write(fd, "") never reaches the node
    stats.sent += 1
    try:
        os.write(fd, command)
        response = os.read(fd, 8192)
    except OSError as e:
        code = e.errno or 0
        stats.refused[code] = stats.refused.get(code, 0) + 1
        if code not in ALLOWED:
            stats.finding(f"errno {e.errno} for {command.hex()}")
        return None
    stats.answered += 1
    ok = len(response) >= 10 and wire.size(response) == len(response)
    if not ok:
        stats.finding(f"torn response {response.hex()} to {command.hex()}")
    return response


def client(node: str, seed: int, quota: int, captured: list[bytes], board: Any, row: int,
           findings_file: str, others: Any = None) -> None:
    """One client process: `quota` commands over a series of opens, reported in `row` of
    `board`. `others`: a shared array where each client publishes the session handles it
    holds, for the others to aim at (slots of OTHERS_PER_CLIENT, chosen by its seed)."""
    rng = random.Random(seed)
    stats = ClientStats(board=board, row=row, findings_file=findings_file)
    reported = 0
    mine = (seed % OTHERS_SLOTS) * OTHERS_PER_CLIENT
    while stats.sent < quota:
        if rng.random() < 0.05:  # an O_NONBLOCK write never read: close with it pending
            fd = os.open(node, os.O_RDWR | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                os.write(fd, wire.create_primary_ecc() if rng.random() < 0.5 else
                         wire.get_random(32))
            os.close(fd)
            stats.sent += 1
            continue
        fd = os.open(node, os.O_RDWR)
        try:
            fz = _node_fuzzer(rng, fd)
            space = _setup_space(fd, rng)
            if others is not None:
                for i in range(OTHERS_PER_CLIENT):
                    others[mine + i] = space.sessions[i] if i < len(space.sessions) else 0
            fz.send = lambda _space, command, _what, fd=fd: _send(fd, command, stats)
            for _ in range(rng.randint(20, 3000)):
                r = rng.random()
                if r < 0.3 and captured:
                    _send(fd, _mutate_captured(rng, captured, space, fz.table, others), stats)
                elif r < 0.33:
                    _send(fd, _huge(rng), stats)
                else:
                    _one(fz, space)
                if stats.sent - reported >= 200:
                    stats.publish()
                    reported = stats.sent
            if rng.random() < 0.1:  # closed with a command in flight, objects and sessions held
                with contextlib.suppress(OSError):
                    os.write(fd, wire.create_primary_ecc())
                    stats.sent += 1
        finally:
            os.close(fd)
    stats.publish()


def _one(fz: Any, space: Any) -> None:
    kind = fz.rng.random()
    if kind < 0.3:
        fz.send(space, fz.random_bytes(space), "random")
    elif kind < 0.65:
        fz.send(space, fz.structured(space), "structured")
    elif kind < 0.95:
        fz.send(space, fz.mutated(space), "mutated")
    else:
        fz.send(space, fz.valid(space), "valid")


# -- the driver --------------------------------------------------------------------------


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Probe(threading.Thread):
    """A well-behaved client beside the fuzzers: GetRandom every PROBE_EVERY seconds. Paused
    (its descriptor closed) while the driver looks at the TPM with every space closed."""

    def __init__(self, node: str):
        super().__init__(name="probe", daemon=True)
        self.node = node
        self.stop = threading.Event()
        self.paused = threading.Event()  # set by the probe once its descriptor is closed
        self._pause = threading.Event()
        self.answered = 0
        self.worst = 0.0
        self.failures: list[str] = []

    def pause(self) -> None:
        self._pause.set()
        self.paused.wait()

    def resume(self) -> None:
        self.paused.clear()
        self._pause.clear()

    def run(self) -> None:
        while not self.stop.is_set():
            fd = os.open(self.node, os.O_RDWR)
            try:
                while not self._pause.is_set() and not self.stop.wait(PROBE_EVERY):
                    start = time.monotonic()
                    try:
                        r = _xact(fd, wire.get_random(8))
                        if wire.rc(r) != 0:
                            self.failures.append(f"rc 0x{wire.rc(r):x}")
                    except OSError as e:
                        self.failures.append(str(e))
                    self.worst = max(self.worst, time.monotonic() - start)
                    self.answered += 1
            finally:
                os.close(fd)
            self.paused.set()
            while self._pause.is_set() and not self.stop.is_set():
                time.sleep(0.01)
        self.paused.set()


@contextlib.contextmanager
def capturing(rm: Any) -> Any:
    """Every command a client sends through the node, as it sent it (virtual handles, the
    RM's session tokens, commands the RM answers itself): what a hostile replay starts from."""
    captured: list[bytes] = []
    submit = rm.submit

    def recording(space: Any, command: bytes, *args: Any, **kwargs: Any) -> Any:
        captured.append(bytes(command))
        return submit(space, command, *args, **kwargs)

    rm.submit = recording
    try:
        yield captured
    finally:
        del rm.submit


def capture_tools_flow(node: str, tmp: Path, rm: Any) -> list[bytes]:
    """Client commands of a tpm2-tools flow on the node."""
    tcti = f"device:{node}"
    steps = [
        ["tpm2_getrandom", "-T", tcti, "16", "--hex"],
        ["tpm2_createprimary", "-T", tcti, "-C", "o", "-G", "ecc", "-c", f"{tmp}/p.ctx"],
        ["tpm2_create", "-T", tcti, "-C", f"{tmp}/p.ctx", "-G", "ecc", "-u", f"{tmp}/k.pub",
         "-r", f"{tmp}/k.priv"],
        ["tpm2_load", "-T", tcti, "-C", f"{tmp}/p.ctx", "-u", f"{tmp}/k.pub", "-r",
         f"{tmp}/k.priv", "-c", f"{tmp}/k.ctx"],
        ["tpm2_readpublic", "-T", tcti, "-c", f"{tmp}/k.ctx"],
        ["tpm2_pcrread", "-T", tcti, "sha256:0,1,2"],
        ["tpm2_hash", "-T", tcti, "-g", "sha256", "-o", f"{tmp}/h.bin", "/etc/hostname"],
        ["tpm2_getcap", "-T", tcti, "properties-fixed"],
    ]
    with capturing(rm) as captured:
        for step in steps:
            if shutil.which(step[0]) is not None:
                subprocess.run(step, capture_output=True, timeout=60, check=False)
    return captured


def capture_pytss_flow(node: str, ctx: Any, rm: Any) -> tuple[list[bytes], str | None]:
    """Client commands of tpm2-pytss ESAPI flows on the node, and the flow's error if any."""
    with capturing(rm) as captured:
        p = ctx.Process(target=_pytss_child, args=(node, (errors := ctx.Queue())))
        p.start()
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
    error = None if p.exitcode == 0 else f"exit {p.exitcode}"
    with contextlib.suppress(Exception):
        error = errors.get(timeout=1) or error
    return captured, error


def _pytss_child(node: str, errors: Any) -> None:
    try:
        pytss_flow(node)
    except Exception as e:  # reported by the driver as a finding
        errors.put(f"tpm2-pytss flow: {type(e).__name__}: {e}")
        raise SystemExit(1) from e
    errors.put(None)


def pytss_flow(node: str) -> None:
    """tpm2-pytss ESAPI flows on the node (run in a child process: libtss2 stays out of the
    driver): a primary, create/load/sign, a salted HMAC session with parameter encryption, a
    policy session, NV define/write/read, ContextSave/Load of a key and of a session."""
    from tpm2_pytss import (
        ESAPI,
        TPM2B_DIGEST,
        TPM2B_NV_PUBLIC,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPML_PCR_SELECTION,
        TPMS_NV_PUBLIC,
        TPMT_SIG_SCHEME,
        TPMT_SYM_DEF,
        TPMT_TK_HASHCHECK,
        TCTILdr,
    )
    from tpm2_pytss.constants import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_CC,
        TPM2_RH,
        TPM2_SE,
        TPM2_ST,
        TPMA_NV,
        TPMA_SESSION,
    )

    storage = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
    signing = "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth"
    aes = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits={"aes": 128}, mode={"aes": TPM2_ALG.CFB})
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    digest = TPM2B_DIGEST(bytes(range(32)))
    with ESAPI(TCTILdr("device", node)) as esys:
        primary = esys.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb", objectAttributes=storage), ESYS_TR.OWNER)[0]
        private, public = esys.create(primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256", objectAttributes=signing))[:2]
        key = esys.load(primary, private, public)
        signature = esys.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
        esys.verify_signature(key, digest, signature)
        # a salted HMAC session, parameters encrypted both ways
        hmac = esys.start_auth_session(tpm_key=primary, bind=ESYS_TR.NONE,
                                       session_type=TPM2_SE.HMAC, symmetric=aes,
                                       auth_hash=TPM2_ALG.SHA256)
        esys.trsess_set_attributes(hmac, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
                                   | TPMA_SESSION.ENCRYPT)
        esys.get_random(16, session1=hmac)
        sealed = TPM2B_SENSITIVE_CREATE()
        sealed.sensitive.data = b"captured for the fuzzer"
        private, public = esys.create(primary, sealed, TPM2B_PUBLIC.parse(
            "keyedhash", objectAttributes="fixedtpm|fixedparent|userwithauth"),
            session1=hmac)[:2]
        blob = esys.load(primary, private, public, session1=hmac)
        esys.unseal(blob, session1=hmac)
        esys.sign(key, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket, session1=hmac)
        # ContextSave/Load of a key and of the session
        key = esys.context_load(esys.context_save(key))
        hmac = esys.context_load(esys.context_save(hmac))
        esys.get_random(8, session1=hmac)
        # a policy session: PCR, command code, auth value, digest, restart
        policy = esys.start_auth_session(tpm_key=ESYS_TR.NONE, bind=ESYS_TR.NONE,
                                         session_type=TPM2_SE.POLICY,
                                         symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                                         auth_hash=TPM2_ALG.SHA256)
        esys.policy_pcr(policy, TPM2B_DIGEST(), TPML_PCR_SELECTION.parse("sha256:0,1,2"))
        esys.policy_command_code(policy, TPM2_CC.Unseal)
        esys.policy_auth_value(policy)
        esys.policy_get_digest(policy)
        esys.policy_restart(policy)
        esys.policy_secret(ESYS_TR.OWNER, policy)
        # NV: define, write, read, read public, undefine
        nv_public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=0x01500F22, nameAlg=TPM2_ALG.SHA256, dataSize=32,
            attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE
            | TPMA_NV.AUTHREAD))
        nv = esys.nv_define_space(b"nv secret", nv_public)
        esys.nv_write(nv, b"written by tpm2-pytss", 0, auth_handle=ESYS_TR.OWNER)
        esys.nv_read(nv, 21, 0, auth_handle=ESYS_TR.OWNER)
        esys.nv_read_public(nv)
        esys.nv_read(nv, 8, 0, session1=hmac)  # the index's own auth, in the HMAC session
        esys.nv_undefine_space(nv)
        for handle in (policy, hmac, blob, key, primary):
            esys.flush_context(handle)


@dataclass
class Snapshot:
    """The TPM's census and the RM's tables, taken in one RM job (nothing runs in between)."""

    transient: set[int]  # the TPM's transient handles
    loaded: set[int]  # session slots (handle & 0xFFFFFF) loaded in the TPM
    saved: set[int]  # session slots saved (contexts held outside it)
    objects: set[int]  # physical transient handles the RM's residency table holds
    sessions: set[int]  # session slots the RM's session table tracks
    resident_sessions: set[int]  # of those, the ones the RM holds loaded (no saved context)
    abandoned: list[tuple[int, bytes]]  # continuation: (handle, token context) left by clients

    def text(self) -> str:
        return (f"TPM transient {sorted(map(hex, self.transient))}, sessions loaded "
                f"{sorted(self.loaded)} saved {sorted(self.saved)}; RM objects "
                f"{sorted(map(hex, self.objects))}, sessions {sorted(self.sessions)}")


def resident_objects(rm: Any) -> set[int]:
    """Physical handles of the objects the RM keeps loaded between commands (rm/residency.py;
    none where every context is put away after each command)."""
    residency = getattr(rm, "residency", None)
    if residency is None:
        return set()
    return set(residency.physical_handles())


def snapshot(rm: Any) -> Snapshot:
    from cusetpm.rm import continuation
    from cusetpm.rm.manager import Job
    from cusetpm.rm.space import Space

    def take() -> Snapshot:
        ex = rm._executor
        slot = 0xFFFFFF
        return Snapshot(
            transient=set(ex.tpm_handles(TPM_HT.TRANSIENT)),
            loaded={h & slot for h in ex.tpm_handles(TPM_HT.HMAC_SESSION)},
            saved={h & slot for h in ex.tpm_handles(TPM_HT.POLICY_SESSION)},
            objects=resident_objects(rm),
            sessions={e.handle & slot for e in rm.sessions},
            resident_sessions={e.handle & slot for e in rm.sessions if e.context is None},
            abandoned=[(e.handle, continuation.token_context(e, e.token)) for e in rm.sessions
                       if e.abandoned and e.token is not None])

    job = Job(Space(uid=-1), take)  # as rm.tpm_census: an RM job, between client commands
    with rm._cv:
        rm._enqueue(job)
    result: Snapshot = job.future.result()
    return result


def census_within(snap: Snapshot, baseline: Snapshot, eager: bool) -> tuple[bool, str]:
    """While spaces are open: what the TPM holds is in the RM's tables or was there before
    us; every session the RM tracks is in the TPM. Eager: nothing loaded between commands."""
    stray_objects = snap.transient - snap.objects - baseline.transient
    in_tpm = snap.loaded | snap.saved
    stray_sessions = in_tpm - snap.sessions - baseline.loaded - baseline.saved
    lost = snap.sessions - in_tpm
    # a loaded session is one the RM holds loaded, and the other way round
    loaded_wrong = (snap.loaded - baseline.loaded) ^ snap.resident_sessions
    ok = not stray_objects and not stray_sessions and not lost and not loaded_wrong \
        and snap.objects <= snap.transient
    if eager:
        ok = ok and snap.transient <= baseline.transient and snap.loaded <= baseline.loaded \
            and not snap.objects
    return ok, (f"{snap.text()}: stray objects {sorted(map(hex, stray_objects))}, stray "
                f"sessions {sorted(stray_sessions)}, tracked but gone {sorted(lost)}, loaded "
                f"but not so in the RM (or the reverse) {sorted(loaded_wrong)}")


def census_closed(snap: Snapshot, baseline: Snapshot) -> tuple[bool, str]:
    """Every space closed: nothing of ours in the TPM but the sessions clients saved and left
    for another descriptor (continuation), which the RM tracks; the RM holds no object."""
    abandoned = {h & 0xFFFFFF for h, _ in snap.abandoned}
    ok = (snap.transient == baseline.transient and snap.loaded == baseline.loaded
          and not snap.objects and snap.sessions == abandoned
          and snap.saved - baseline.saved == abandoned)
    return ok, f"{snap.text()}, abandoned {sorted(abandoned)}"


def census_empty(snap: Snapshot, baseline: Snapshot) -> tuple[bool, str]:
    ok = (snap.transient == baseline.transient and snap.loaded == baseline.loaded
          and snap.saved == baseline.saved and not snap.objects and not snap.sessions)
    return ok, snap.text()


def drop_abandoned(rm: Any, snap: Snapshot) -> None:
    """Load the sessions clients saved and left into a fresh space, and close it (a flush)."""
    from cusetpm.rm import RMError

    for _, context in snap.abandoned:
        space = rm.open_space()
        with contextlib.suppress(RMError):
            rm.transmit(space, wire.context_load(context))
        rm.close_space(space)


def wait_spaces_closed(rm: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while rm.open_spaces > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def per_code_state(rm: Any) -> dict[str, int]:
    """How many command codes the RM keeps per-code state for: the TPM's own codes at most
    (and one bucket for the rest), or a client could grow it without bound."""
    table = rm._executor.table
    latency = set(rm.counters.latency)
    durations = {code for code, _ in rm.scheduler.durations.averages}
    unknown = {c for c in latency | durations if c not in table}
    return {"latency": len(latency), "durations": len(durations), "unknown_codes": len(unknown)}


CENSUS_EVERY = 2.0  # seconds between the in-phase census checks
STALL_BOUND = 60.0  # a phase without progress this long is a finding (and ends the run)


def run(total: int, clients: int, phase: int, seed: int,
        residency: str = "resident") -> dict[str, Any]:
    """`total` hostile commands in phases of `phase`, the RM in one residency mode."""
    from cusetpm.backends.libtpms import LibtpmsBackend
    from cusetpm.frontends.files import TpmFileOps
    from cusetpm.frontends.native import NativeReplies, NodeSession
    from cusetpm.frontends.spec import NodeSpec
    from cusetpm.rm import ResourceManager, RMConfig

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["bench.fuzz", "tests.rm.test_fuzz"])
    tmp = Path(tempfile.mkdtemp(prefix="cusetpm-fuzz-"))
    mount = tmp / "mnt"
    mount.mkdir()
    backend = LibtpmsBackend(tmp / "state")
    guard = GuardBackend(backend)
    rm = ResourceManager(guard, RMConfig(max_objects=8, max_sessions=4, residency=residency))
    rm.start()
    guard.rm = rm
    has_residency = getattr(rm, "residency", None) is not None
    ops = TpmFileOps(rm, NativeReplies())
    session = NodeSession(ops, NodeSpec(fuse_mount=str(mount), mode=0o666))
    session.start()
    node = str(mount / "tpmrm0")
    rng = random.Random(seed)
    phases: list[dict[str, Any]] = []
    findings: list[str] = []
    killed = 0
    sent = 0
    rss: list[int] = [rss_kib()]
    refused: dict[int, int] = {}
    census_checks = 0
    eager = residency == "eager"
    others = ctx.Array("I", OTHERS_SLOTS * OTHERS_PER_CLIENT, lock=False)
    # Allocated once: the multiprocessing heap keeps what it hands out, and a board per phase
    # (1.3 MB each) showed as daemon RSS growth in this very process.
    board = ctx.Array("q", CLIENT_SLOTS * ROW, lock=False)
    started = time.monotonic()
    try:
        baseline = snapshot(rm)  # what the TPM held before any client: not ours
        tools = capture_tools_flow(node, tmp, rm)
        pytss, pytss_error = capture_pytss_flow(node, ctx, rm)
        if pytss_error is not None:
            findings.append(pytss_error)
        captured = tools + pytss
        if not wait_spaces_closed(rm):
            findings.append(f"{rm.open_spaces} spaces still open after the captured flows")
        snap = snapshot(rm)
        drop_abandoned(rm, snap)
        ok, text = census_empty(snapshot(rm), baseline)
        if not ok:
            findings.append(f"after the captured flows: {text}")
        probe = Probe(node)
        probe.start()
        serial = 0
        while sent < total:
            ctypes.memset(board, 0, ctypes.sizeof(board))  # one board per run, not per phase
            rows = 0
            quota = max(1, phase // clients)
            t0 = time.monotonic()
            next_census = t0 + CENSUS_EVERY
            census_ok = True

            def spawn(quota: int = quota, board: Any = board) -> Any:
                nonlocal serial, rows
                serial += 1
                rows = min(rows + 1, CLIENT_SLOTS)  # past the last row: the last one shared
                p = ctx.Process(target=client, args=(
                    node, seed * 1000 + serial, quota, captured, board, rows - 1,
                    str(tmp / f"findings-{serial}"), others))
                p.start()
                return p

            procs = [spawn() for _ in range(clients)]
            last_progress, last_change = 0, time.monotonic()
            while (progress := board_sent(board)) < phase:
                time.sleep(0.5)
                if progress != last_progress:
                    last_progress, last_change = progress, time.monotonic()
                elif time.monotonic() - last_change > STALL_BOUND:  # clients die at start
                    findings.append(f"phase {len(phases) + 1}: no progress in {STALL_BOUND} s")
                    break
                rss.append(rss_kib())
                if time.monotonic() >= next_census:  # spaces open, clients mid-work
                    ok, text = census_within(snapshot(rm), baseline, eager)
                    census_checks += 1
                    next_census = time.monotonic() + CENSUS_EVERY
                    if not ok:
                        census_ok = False
                        findings.append(f"during phase {len(phases) + 1}: {text}")
                alive = [p for p in procs if p.is_alive()]
                if rng.random() < 0.3 and alive:  # SIGKILL a client mid-work
                    victim = rng.choice(alive)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed += 1
                living = [p for p in procs if p.is_alive()]
                if len(living) < clients:
                    procs = living + [spawn() for _ in range(clients - len(living))]
            for p in procs:
                with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
                    os.kill(p.pid, signal.SIGKILL)
                p.join()
            for k, v in board_errnos(board).items():
                refused[k] = refused.get(k, 0) + v
            for path in sorted(tmp.glob("findings-*")):
                findings.extend(path.read_text().splitlines())
                path.unlink()
            done = board_sent(board)
            sent += done
            stalled = done < phase
            # Every client gone and the probe paused: the RM closes their spaces, and then
            # the TPM holds nothing of ours but the sessions left for continuation.
            probe.pause()
            if not wait_spaces_closed(rm):
                census_ok = False
                findings.append(f"after phase {len(phases) + 1}: {rm.open_spaces} spaces open")
            snap = snapshot(rm)
            ok, text = census_closed(snap, baseline)
            if not ok:
                findings.append(f"after phase {len(phases) + 1}, every space closed: {text}")
            drop_abandoned(rm, snap)
            ok2, text = census_empty(snapshot(rm), baseline)
            if not ok2:
                findings.append(f"after phase {len(phases) + 1}, continuation dropped: {text}")
            census_checks += 2
            probe.resume()
            census_ok = census_ok and ok and ok2
            phases.append({"commands": done, "seconds": round(time.monotonic() - t0, 1),
                           "census_ok": census_ok, "abandoned": len(snap.abandoned),
                           "rss_kib": rss_kib()})
            print(f"fuzz ({residency}): phase {len(phases)}: {done} commands in "
                  f"{phases[-1]['seconds']} s, census {'ok' if census_ok else 'MISMATCH'}, "
                  f"rss {rss[-1]} KiB, {killed} killed, probe worst {probe.worst:.3f} s",
                  flush=True)
            if stalled:
                break
        probe.stop.set()
        probe.resume()
        probe.join()
        per_code = per_code_state(rm)
        if per_code["unknown_codes"] > 1:
            findings.append(
                f"the RM keeps state for {per_code['unknown_codes']} command codes the TPM "
                f"does not know (counters.latency {per_code['latency']}, scheduler "
                f"durations {per_code['durations']} keys): it grows with every distinct code "
                "a client sends")
    finally:
        session.stop()
        rm.stop()
        ops.abandon()
        session.destroy()
        backend.close()
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    if probe.worst > PROBE_BOUND:
        findings.append(f"probe answered after {probe.worst:.2f} s (bound {PROBE_BOUND} s)")
    findings.extend(f"probe: {f}" for f in probe.failures[:10])
    findings.extend(guard.violations[:20])
    if max(rss) > RSS_BOUND_KIB:
        findings.append(f"RSS {max(rss)} KiB over the bound {RSS_BOUND_KIB} KiB")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                   f"kernel {platform.release()}",
        "residency": residency,
        # False before rm/residency.py: the mode is parsed but every context is put away
        "rm_has_residency": has_residency,
        "seed": seed, "clients": clients, "commands": sent, "seconds": round(elapsed, 1),
        "commands_per_s": round(sent / elapsed), "clients_killed": killed,
        "captured_tools_commands": len(tools), "captured_pytss_commands": len(pytss),
        "captured_codes": sorted({command_name(c) for c in captured if len(c) >= 10}),
        "guard_checked": guard.checked, "guard_violations": len(guard.violations),
        "census_checks": census_checks,
        "rm_per_code_state": per_code,
        "probe_answered": probe.answered, "probe_worst_s": round(probe.worst, 3),
        "probe_bound_s": PROBE_BOUND, "rss_start_kib": rss[0], "rss_max_kib": max(rss),
        "rss_end_kib": rss[-1], "rss_bound_kib": RSS_BOUND_KIB,
        "refused_errnos": {errno.errorcode.get(k, str(k)): v for k, v in sorted(refused.items())},
        "phases": phases, "findings": findings,
    }


def report_run(r: dict[str, Any]) -> list[str]:
    lines = [
        f"## residency {r['residency']}: {r['commands']:,} commands",
        "",
        f"{r['date']}, {r['machine']}. Seed {r['seed']}, {r['clients']} client processes.",
        "",
        *([] if r["rm_has_residency"] else [
            "This RM has no rm/residency.py yet: `residency` is parsed but not acted on, "
            "every context is put away after each command.", ""]),
        f"- {r['commands']:,} commands in {r['seconds']} s: **{r['commands_per_s']:,} commands/s**",
        f"- clients SIGKILLed mid-work: {r['clients_killed']}",
        f"- captured client commands mutated: {r['captured_tools_commands']} from tpm2-tools, "
        f"{r['captured_pytss_commands']} from tpm2-pytss ESAPI "
        f"({len(r['captured_codes'])} command codes: {', '.join(r['captured_codes'])})",
        f"- client commands checked at the backend: {r['guard_checked']:,}; naming another "
        f"space's object or session, or an unmapped virtual handle: **{r['guard_violations']}**",
        f"- census checks: {r['census_checks']} (every {CENSUS_EVERY:g} s with spaces open: "
        "what the TPM holds is in the RM's tables or the baseline; after each phase, every "
        "space closed: only the sessions left for continuation, then nothing)",
        f"- probe client: {r['probe_answered']} GetRandoms, slowest {r['probe_worst_s']} s "
        f"(bound {r['probe_bound_s']} s)",
        f"- daemon RSS: {r['rss_start_kib']} KiB at start, {r['rss_max_kib']} KiB at most, "
        f"{r['rss_end_kib']} KiB at the end (bound {r['rss_bound_kib']} KiB)",
        f"- errnos earned: {r['refused_errnos']}",
        f"- census right in all {len(r['phases'])} phases: "
        f"{all(p['census_ok'] for p in r['phases'])}",
        f"- findings: {len(r['findings'])}",
        "",
    ]
    lines += [f"  - `{f[:300]}`" for f in r["findings"]]
    lines += ["", "| phase | commands | seconds | census ok | sessions left for continuation "
              "| RSS KiB |", "|---:|---:|---:|:-:|---:|---:|"]
    lines += [f"| {i + 1} | {p['commands']} | {p['seconds']} | {p['census_ok']} | "
              f"{p['abandoned']} | {p['rss_kib']} |" for i, p in enumerate(r["phases"])]
    return [*lines, ""]


def report(runs: list[dict[str, Any]]) -> str:
    total = sum(r["commands"] for r in runs)
    findings = sum(len(r["findings"]) for r in runs)
    lines = [
        f"# make fuzz: {total:,} hostile commands through the FUSE node",
        "",
        f"Residency modes: {', '.join(r['residency'] for r in runs)}; "
        f"clients SIGKILLed: {sum(r['clients_killed'] for r in runs)}; "
        f"findings: **{findings}**.",
        "",
    ]
    for r in runs:
        lines += report_run(r)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1_000_000,
                        help="commands per residency mode")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0xF022)
    parser.add_argument("--residency", choices=("both", "resident", "eager"), default="both")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import logging

    # The RM logs every refusal at WARNING: a million of them would drown the report.
    logging.basicConfig(level=logging.ERROR)
    modes = ["resident", "eager"] if args.residency == "both" else [args.residency]
    runs = [run(args.commands, args.clients, min(args.phase, args.commands), args.seed, mode)
            for mode in modes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(report(runs))
    print(report(runs))
    return 0 if not any(r["findings"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
