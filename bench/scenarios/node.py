"""Raw client scenarios: file semantics, spaces, isolation, limits, cleanup,
continuation, regap and exhaustion, with hand-built commands on the node.

The file-semantics rows follow drivers/char/tpm/tpm-dev-common.c and the kernel
selftests (tools/testing/selftests/tpm2); the spaces rows follow tpm2-space.c
(shared/reference/kernel-tpmrm.md). Details are canonical strings so the same
behaviour reads the same on every system.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.scenarios import Outcome, errname, scenario, wire
from bench.scenarios.conn import Conn, NodeConn, Target

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT = 180.0  # a Python start under TCG takes seconds; this only bounds a hang
BAD_VHANDLE = 0x80123456  # the kernel selftest's "invalid context" handle


def attempt(conn: Conn, command: bytes) -> tuple[str, bytes | None]:
    """('rc 0x…', response) or (errno name, None): what one command did, as a word."""
    try:
        response = conn.transact(command)
    except Exception as exc:  # OSError from a node; TSS2_Exception from a TCTI
        return errname(exc), None
    return f"rc {wire.rc(response):#x}", response


def oserr(func, *args) -> str:  # type: ignore[no-untyped-def]
    """The errno name a call fails with, or 'ok'."""
    try:
        func(*args)
    except OSError as exc:
        return errname(exc)
    return "ok"


def poll_events(fd: int, events: int, timeout_ms: int) -> int:
    p = select.poll()
    p.register(fd, events)
    ready = p.poll(timeout_ms)
    return ready[0][1] if ready else 0


def node_fd(target: Target, nonblock: bool = False) -> NodeConn:
    conn = target.open(nonblock)
    assert isinstance(conn, NodeConn)
    return conn


def active_sessions(target: Target) -> int:
    """TPM_PT_HR_ACTIVE: sessions the TPM holds (loaded or saved), from a fresh space.
    RMs pass this property through, so it shows what every space left behind."""
    with target.open() as conn:
        response = conn.transact(wire.get_capability(wire.CAP_TPM_PROPERTIES,
                                                     wire.PT_HR_ACTIVE, 1))
    return wire.cap_property(response).get(wire.PT_HR_ACTIVE, -1)


def tpm_property(target: Target, prop: int) -> int:
    with target.open() as conn:
        response = conn.transact(wire.get_capability(wire.CAP_TPM_PROPERTIES, prop, 1))
    return wire.cap_property(response).get(prop, -1)


def child(mode: str, target: Target) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.scenarios.child", mode, target.to_json()],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **target.env, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


# -- file semantics (tpm-dev-common.c) --------------------------------------------------


@scenario("file", kernel_defined=True, needs_node=True)
def fs_round_trip(target: Target, quick: bool) -> Outcome:
    """write GetRandom(8) returns 12; read returns the 20-byte response, then 0"""
    with node_fd(target) as c:
        written = os.write(c.fd, wire.get_random(8))
        first = os.read(c.fd, 4096)
        second = os.read(c.fd, 4096)
    detail = f"write {written}, read {len(first)} rc {wire.rc(first):#x}, then {len(second)}"
    return Outcome.check(detail == "write 12, read 20 rc 0x0, then 0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_write_e2big(target: Target, quick: bool) -> Outcome:
    """a write of 4097 bytes fails with E2BIG, even while a response is pending"""
    with node_fd(target) as c:
        idle = oserr(os.write, c.fd, wire.get_random(8) + bytes(4097 - 12))
        os.write(c.fd, wire.get_random(8))
        pending = oserr(os.write, c.fd, bytes(4097))
        os.read(c.fd, 4096)
    detail = f"idle {idle}, pending {pending}"
    return Outcome.check(detail == "idle E2BIG, pending E2BIG", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_short_write_einval(target: Target, quick: bool) -> Outcome:
    """9-byte write, and a write shorter than its header's size: EINVAL, nothing queued"""
    with node_fd(target) as c:
        nine = oserr(os.write, c.fd, wire.get_random(8)[:9])
        short = oserr(os.write, c.fd, wire.get_random(8)[:10])  # header says 12
        after = len(os.read(c.fd, 4096))
    detail = f"9 bytes {nine}, short of header {short}, then read {after}"
    return Outcome.check(detail == "9 bytes EINVAL, short of header EINVAL, then read 0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_excess_bytes_ignored(target: Target, quick: bool) -> Outcome:
    """bytes beyond the header's size are accepted and ignored"""
    with node_fd(target) as c:
        command = wire.get_random(8) + b"garbage"
        written = os.write(c.fd, command)
        response = os.read(c.fd, 4096)
    detail = f"write {written}/{len(command)}, response {len(response)} rc {wire.rc(response):#x}"
    return Outcome.check(detail == "write 19/19, response 20 rc 0x0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_second_write_ebusy(target: Target, quick: bool) -> Outcome:
    """a second write before the response is read: EBUSY; the response stays intact"""
    with node_fd(target) as c:
        os.write(c.fd, wire.get_random(8))
        busy = oserr(os.write, c.fd, wire.get_random(8))
        response = os.read(c.fd, 4096)
    detail = f"{busy}, then read {len(response)} rc {wire.rc(response):#x}"
    return Outcome.check(detail == "EBUSY, then read 20 rc 0x0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_partial_reads(target: Target, quick: bool) -> Outcome:
    """GetRandom(16) read as 10 + 5 + rest, then 0 (selftest test_read_partial_resp)"""
    with node_fd(target) as c:
        os.write(c.fd, wire.get_random(16))
        parts = [len(os.read(c.fd, 10)), len(os.read(c.fd, 5)), len(os.read(c.fd, 4096)),
                 len(os.read(c.fd, 4096))]
    detail = "+".join(map(str, parts))
    return Outcome.check(detail == "10+5+13+0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_partial_read_then_write(target: Target, quick: bool) -> Outcome:
    """after a partial read a new write is accepted (selftest test_read_partial_overwrite)"""
    with node_fd(target) as c:
        os.write(c.fd, wire.get_random(16))
        os.read(c.fd, 10)
        accepted = oserr(os.write, c.fd, wire.get_random(4))
        response = os.read(c.fd, 4096)
    detail = f"write {accepted}, read {len(response)}"
    return Outcome.check(detail == "write ok, read 16", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_read_idle_returns_0(target: Target, quick: bool) -> Outcome:
    """read with nothing pending returns 0 at once, blocking and O_NONBLOCK"""
    with node_fd(target) as c, node_fd(target, nonblock=True) as nb:
        start = time.monotonic()
        blocking, nonblocking = os.read(c.fd, 4096), os.read(nb.fd, 4096)
        fast = time.monotonic() - start < 1.0
    detail = f"blocking {len(blocking)}, nonblocking {len(nonblocking)}, at once {fast}"
    return Outcome.check(detail == "blocking 0, nonblocking 0, at once True", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_nonblock_poll(target: Target, quick: bool) -> Outcome:
    """O_NONBLOCK: POLLOUT when idle, write returns at once, POLLIN when the response is ready"""
    every = select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
    names = {select.POLLIN: "IN", select.POLLRDNORM: "RDNORM",
             select.POLLOUT: "OUT", select.POLLWRNORM: "WRNORM"}

    def show(mask: int) -> str:
        return "|".join(n for bit, n in names.items() if mask & bit) or "-"

    with node_fd(target, nonblock=True) as c:
        before = show(poll_events(c.fd, every, 0))
        written = os.write(c.fd, wire.get_random(8))
        ready = show(poll_events(c.fd, select.POLLIN, 10_000))
        ready_all = show(poll_events(c.fd, every, 0))
        response = os.read(c.fd, 4096)
        after = show(poll_events(c.fd, every, 0))
    detail = (f"idle {before}; write {written}; ready {ready} ({ready_all}); "
              f"read rc {wire.rc(response):#x}; after {after}")
    want = "idle OUT|WRNORM; write 12; ready IN (IN|RDNORM); read rc 0x0; after OUT|WRNORM"
    return Outcome.check(detail == want, detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_async_error_is_read_errno(target: Target, quick: bool) -> Outcome:
    """O_NONBLOCK FlushContext(0x80123456): write accepted, read fails EINVAL (selftest)"""
    with node_fd(target, nonblock=True) as c:
        written = oserr(os.write, c.fd, wire.flush_context(BAD_VHANDLE))
        ready = bool(poll_events(c.fd, select.POLLIN, 10_000) & select.POLLIN)
        first = oserr(os.read, c.fd, 4096)
        then = len(os.read(c.fd, 4096))
    detail = f"write {written}, POLLIN {ready}, read {first}, then {then}"
    return Outcome.check(detail == "write ok, POLLIN True, read EINVAL, then 0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_blocking_error_is_write_errno(target: Target, quick: bool) -> Outcome:
    """blocking FlushContext(0x80123456): write fails EINVAL, nothing to read"""
    with node_fd(target) as c:
        written = oserr(os.write, c.fd, wire.flush_context(BAD_VHANDLE))
        then = len(os.read(c.fd, 4096))
    detail = f"write {written}, then read {then}"
    return Outcome.check(detail == "write EINVAL, then read 0", detail)


@scenario("file", kernel_defined=True, needs_node=True)
def fs_zero_length_read(target: Target, quick: bool) -> Outcome:
    """read(fd, 0) with a response pending: the kernel discards the response"""
    with node_fd(target) as c:
        os.write(c.fd, wire.get_random(8))
        os.read(c.fd, 0)
        rest = len(os.read(c.fd, 4096))
        # If the response survived, the file must still be usable either way.
        usable = oserr(os.write, c.fd, wire.get_random(8))
        if usable == "ok":
            os.read(c.fd, 4096)
    detail = "response discarded" if rest == 0 else f"response kept ({rest} bytes read after)"
    return Outcome.check(rest == 0, detail)


# -- spaces (tpm2-space.c) ----------------------------------------------------------------


@scenario("spaces", kernel_defined=True)
def sp_unknown_command_code(target: Target, quick: bool) -> Outcome:
    """command code 0x1FE: a 10-byte response with rc 0x000B0143 (selftest test_invalid_cc)"""
    with target.open() as c:
        what, response = attempt(c, wire.command(0x1FE))
    if response is None:
        return Outcome("fail", what)
    detail = f"{len(response)} bytes, rc {wire.rc(response):#010x}"
    return Outcome.check(detail == "10 bytes, rc 0x000b0143", detail)


@scenario("spaces", kernel_defined=True)
def sp_virtual_handles(target: Target, quick: bool) -> Outcome:
    """two primaries in one space get 0x80FFFFFF, 0x80FFFFFE (the kernel's virtual handles)"""
    with target.open() as c:
        handles = [wire.handle(c.transact(wire.create_primary_ecc())) for _ in range(2)]
        for h in handles:
            c.transact(wire.flush_context(h))
    detail = ", ".join(f"{h:#010x}" for h in handles)
    return Outcome.check(detail == "0x80ffffff, 0x80fffffe", detail)


def _list_paged(c: Conn, first: int) -> list[int]:
    """GetCapability(HANDLES) one handle at a time, as the selftests' Client.get_cap does."""
    found: list[int] = []
    prop = first
    for _ in range(64):
        response = c.transact(wire.get_capability(wire.CAP_HANDLES, prop, 1))
        more, handles = wire.cap_handles(response)
        found += handles
        if not more or not handles:
            break
        prop = handles[-1] + 1
    return found


def _list_all(c: Conn, first: int) -> list[int]:
    """GetCapability(HANDLES, first, 64): one request, as tpm2_getcap does."""
    return wire.cap_handles(c.transact(wire.get_capability(wire.CAP_HANDLES, first, 64)))[1]


@scenario("spaces", kernel_defined=True)
def sp_getcap_own_transients(target: Target, quick: bool) -> Outcome:
    """space A holds 1 primary, B holds 2: each lists exactly its own (count 64)"""
    with target.open() as a, target.open() as b:
        mine_a = [wire.handle(a.transact(wire.create_primary_ecc()))]
        mine_b = [wire.handle(b.transact(wire.create_primary_ecc())) for _ in range(2)]
        seen_a, seen_b = _list_all(a, wire.HT_TRANSIENT), _list_all(b, wire.HT_TRANSIENT)
    detail = (f"A lists {len(seen_a)} ({'own' if sorted(seen_a) == sorted(mine_a) else 'wrong'}), "
              f"B lists {len(seen_b)} ({'own' if sorted(seen_b) == sorted(mine_b) else 'wrong'})")
    return Outcome.check(detail == "A lists 1 (own), B lists 2 (own)", detail)


@scenario("spaces", kernel_defined=False)
def sp_getcap_paged_by_one(target: Target, quick: bool) -> Outcome:
    """B holds 2 primaries and pages GetCapability(HANDLES) with count 1 (selftest get_cap)"""
    with target.open() as b:
        mine = [wire.handle(b.transact(wire.create_primary_ecc())) for _ in range(2)]
        seen = _list_paged(b, wire.HT_TRANSIENT)
    detail = f"{len(seen)} of {len(mine)} listed"
    return Outcome.check(sorted(seen) == sorted(mine), detail)


@scenario("spaces", kernel_defined=True)
def sp_flush_frees_slot(target: Target, quick: bool) -> Outcome:
    """FlushContext(vhandle) succeeds and the next object reuses 0x80FFFFFF"""
    with target.open() as c:
        first = wire.handle(c.transact(wire.create_primary_ecc()))
        flushed, _ = attempt(c, wire.flush_context(first))
        again = wire.handle(c.transact(wire.create_primary_ecc()))
    detail = f"flush {flushed}, next {again:#010x}"
    return Outcome.check(detail == "flush rc 0x0, next 0x80ffffff", detail)


@scenario("spaces", kernel_defined=True)
def sp_object_context_save_load(target: Target, quick: bool) -> Outcome:
    """ContextSave(vhandle), FlushContext, ContextLoad: a usable object with a fresh vhandle"""
    with target.open() as c:
        h = wire.handle(c.transact(wire.create_primary_ecc()))
        saved, response = attempt(c, wire.context_save(h))
        flushed, _ = attempt(c, wire.flush_context(h))
        if response is None or wire.rc(response):
            return Outcome("fail", f"save {saved}")
        loaded, lresp = attempt(c, wire.context_load(wire.parameters(response)))
        if lresp is None or wire.rc(lresp):
            return Outcome("fail", f"save {saved}, flush {flushed}, load {loaded}")
        again = wire.handle(lresp)
        public, _ = attempt(c, wire.read_public(again))
    detail = f"save {saved}, flush {flushed}, load {loaded} -> {again:#010x}, readpublic {public}"
    want = "save rc 0x0, flush rc 0x0, load rc 0x0 -> 0x80ffffff, readpublic rc 0x0"
    return Outcome.check(detail == want, detail)


@scenario("spaces", kernel_defined=False)
def sp_other_sessions_listed(target: Target, quick: bool) -> Outcome:
    """GetCapability(HANDLES, sessions) lists another space's sessions? (kernel: passes through)"""
    with target.open() as a, target.open() as b:
        theirs = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        a.transact(wire.get_random(1))  # the kernel saves A's session after each command
        seen = (_list_paged(b, wire.HT_HMAC_SESSION) + _list_paged(b, wire.HT_POLICY_SESSION))
    # Compare session indexes: a TPM may list a saved policy session in either handle form.
    visible = any(h & 0xFFFFFF == theirs & 0xFFFFFF for h in seen)
    return Outcome("figure", f"other space's session {'listed' if visible else 'hidden'}")


# -- isolation ------------------------------------------------------------------------------


@scenario("isolation", kernel_defined=True)
def iso_other_space_transient(target: Target, quick: bool) -> Outcome:
    """space B names A's object 0x80FFFFFF: refused (kernel: EINVAL); A's object unharmed"""
    with target.open() as a, target.open() as b:
        h = wire.handle(a.transact(wire.create_primary_ecc()))
        b.transact(wire.get_random(1))
        flush, _ = attempt(b, wire.flush_context(h))
        public, _ = attempt(b, wire.read_public(h))
        owner, _ = attempt(a, wire.read_public(h))
    detail = f"B flush {flush}, B readpublic {public}, A readpublic {owner}"
    return Outcome.check(detail == "B flush EINVAL, B readpublic EINVAL, A readpublic rc 0x0",
                         detail)


@scenario("isolation", kernel_defined=True)
def iso_use_other_space_session(target: Target, quick: bool) -> Outcome:
    """space B uses A's policy session (PolicyGetDigest): refused; A's session unharmed"""
    with target.open() as a, target.open() as b:
        s = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        used, _ = attempt(b, wire.policy_get_digest(s))
        owner, _ = attempt(a, wire.policy_get_digest(s))
    refused = used != "rc 0x0"
    return Outcome.check(refused and owner == "rc 0x0", f"B {used}, A {owner}")


@scenario("isolation", kernel_defined=True)
def iso_flush_absent_session(target: Target, quick: bool) -> Outcome:
    """FlushContext of a session never started, then of A's: the TPM's rc for an absent one"""
    with target.open() as a, target.open() as b:
        s = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        absent = wire.HT_POLICY_SESSION | ((s & 0xFFFFFF) + 17) % 64
        never, _ = attempt(b, wire.flush_context(absent))
        a.transact(wire.flush_context(s))
        gone, _ = attempt(a, wire.flush_context(s))
    detail = f"never started {never}, already flushed {gone}"
    return Outcome.check(detail == "never started rc 0x1cb, already flushed rc 0x1cb", detail)


@scenario("file", kernel_defined=True)
def fs_bad_tag(target: Target, quick: bool) -> Outcome:
    """GetRandom with tag 0x8003: the TPM's answer (the kernel passes it on), not an errno"""
    with target.open() as c:
        bad = bytearray(wire.get_random(8))
        bad[0:2] = (0x8003).to_bytes(2, "big")
        what, _ = attempt(c, bytes(bad))
        after, _ = attempt(c, wire.get_random(8))
    detail = f"tag 0x8003 {what}, then {after}"
    return Outcome.check(detail == "tag 0x8003 rc 0x84, then rc 0x0", detail)


@scenario("isolation", kernel_defined=False)
def iso_flush_other_space_session(target: Target, quick: bool) -> Outcome:
    """space B flushes A's saved session (the kernel's hole): pass = refused, A's session intact"""
    with target.open() as a, target.open() as b:
        s = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        flush, _ = attempt(b, wire.flush_context(s))
        owner, _ = attempt(a, wire.policy_get_digest(s))
    ok = flush != "rc 0x0" and owner == "rc 0x0"
    return Outcome.check(ok, f"B flush {flush}, A then {owner}")


# -- limits -----------------------------------------------------------------------------------


def _count_until_refused(target: Target, command: bytes, cap: int) -> str:
    with target.open() as c:
        for n in range(cap):
            what, response = attempt(c, command)
            if response is None or wire.rc(response):
                return f"{n} (#{n + 1}: {what})"
    return f"{cap}+ (stopped at {cap})"


@scenario("limits", kernel_defined=False)
def lim_objects_per_space(target: Target, quick: bool) -> Outcome:
    """transient objects one space can hold (HashSequenceStart until refused)"""
    return Outcome("figure", _count_until_refused(target, wire.hash_sequence_start(),
                                                  20 if quick else 80))


@scenario("limits", kernel_defined=False)
def lim_sessions_per_space(target: Target, quick: bool) -> Outcome:
    """sessions one space can hold (StartAuthSession until refused)"""
    return Outcome("figure", _count_until_refused(target, wire.start_auth_session(), 20))


# -- cleanup after SIGKILL ----------------------------------------------------------------------


@scenario("cleanup", kernel_defined=True)
def cleanup_after_sigkill(target: Target, quick: bool) -> Outcome:
    """a client holding 3 sessions + 2 objects is SIGKILLed: the TPM's active sessions go back"""
    before = active_sessions(target)
    proc = child("hold", target)
    try:
        line = read_line(proc, CHILD_TIMEOUT)
        if line != "ready":
            return Outcome("fail", f"child did not get ready: {line!r}")
        held = active_sessions(target)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    after = active_sessions(target)
    while after != before and time.monotonic() < deadline:
        time.sleep(0.1)
        after = active_sessions(target)
    detail = f"active sessions {before} -> {held} while held -> {after} after kill"
    return Outcome.check(after == before and held == before + 3, detail)


# -- session continuation -------------------------------------------------------------------------


@scenario("continuation", kernel_defined=False)
def cont_from_exited_process(target: Target, quick: bool) -> Outcome:
    """process 1 saves a policy session and exits; process 2 ContextLoads the blob and uses it"""
    proc = child("save", target)
    line = read_line(proc, CHILD_TIMEOUT)
    proc.wait(CHILD_TIMEOUT)
    parts = line.split()
    if len(parts) != 2 or parts[0] == "error":
        return Outcome("fail", f"child: {line!r}")
    handle, blob = int(parts[0], 16), bytes.fromhex(parts[1])
    with target.open() as c:
        loaded, response = attempt(c, wire.context_load(blob))
        same = response is not None and wire.rc(response) == 0 and wire.handle(response) == handle
        used, _ = attempt(c, wire.policy_get_digest(handle))
        attempt(c, wire.flush_context(handle))
    detail = f"load {loaded} (same handle {same}), use {used}"
    return Outcome.check(detail == "load rc 0x0 (same handle True), use rc 0x0", detail)


@scenario("continuation", kernel_defined=False)
def cont_from_open_space(target: Target, quick: bool) -> Outcome:
    """space A saves its session and stays open; space B loads the blob and uses it"""
    with target.open() as a, target.open() as b:
        s = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        saved = a.transact(wire.context_save(s))
        loaded, _ = attempt(b, wire.context_load(wire.parameters(saved)))
        used, _ = attempt(b, wire.policy_get_digest(s))
        attempt(b, wire.flush_context(s))
    detail = f"B load {loaded}, B use {used}"
    return Outcome.check(detail == "B load rc 0x0, B use rc 0x0", detail)


@scenario("continuation", kernel_defined=False)
def cont_abandoned_kept(target: Target, quick: bool) -> Outcome:
    """20 spaces each save a session and close without flushing: how many stay in the TPM"""
    before = active_sessions(target)
    blobs: list[bytes] = []
    for _ in range(20):
        with target.open() as c:
            s = wire.handle(c.transact(wire.start_auth_session(wire.SE_POLICY)))
            blobs.append(wire.parameters(c.transact(wire.context_save(s))))
    kept = active_sessions(target) - before
    loadable = 0
    for blob in blobs:  # clean up: a loaded session is flushed when its space closes
        with target.open() as c:
            what, _ = attempt(c, wire.context_load(blob))
            loadable += what == "rc 0x0"
    left = active_sessions(target) - before
    return Outcome("figure", f"{kept} of 20 kept; {loadable} still loadable; {left} left after")


# -- regap ----------------------------------------------------------------------------------------


REGAP_COMMANDS = 70_000  # > 65,535 saves even at one save per command
REGAP_TIME_CAP = 600.0  # seconds per system: the kernel needs ~21,850 commands (3 saves each)


@scenario("regap", kernel_defined=False, destructive=True)
def regap_old_session_survives(target: Target, quick: bool) -> Outcome:
    """A keeps an idle session while B runs N commands on its own sessions (each saved by the RM)"""
    n = 3_000 if quick else REGAP_COMMANDS
    gap = tpm_property(target, wire.PT_CONTEXT_GAP_MAX)
    with target.open() as a, target.open() as b:
        sa = wire.handle(a.transact(wire.start_auth_session(wire.SE_POLICY)))
        mine: list[int] = []
        for _ in range(4):  # kernel: 3 fit; more sessions than TPM slots force swaps
            response = b.transact(wire.start_auth_session(wire.SE_POLICY))
            if wire.rc(response):
                break
            mine.append(wire.handle(response))
        commands = [wire.policy_get_digest(s) for s in mine]
        k = len(commands)
        error = ""
        start = time.monotonic()
        done = 0
        if isinstance(b, NodeConn):  # the cheap loop: prebuilt bytes, raw syscalls
            fd, write, read = b.fd, os.write, os.read
            try:
                for done in range(n):
                    write(fd, commands[done % k])
                    response = read(fd, 4096)
                    if response[6:10] != b"\0\0\0\0":
                        error = f"rc {wire.rc(response):#x}"
                        break
                    if done & 1023 == 0 and time.monotonic() - start > REGAP_TIME_CAP:
                        break
                else:
                    done = n
            except OSError as exc:
                error = errname(exc)
        else:
            for done in range(n):
                what, response = attempt(b, commands[done % k])
                if what != "rc 0x0":
                    error = what
                    break
                if done & 1023 == 0 and time.monotonic() - start > REGAP_TIME_CAP:
                    break
            else:
                done = n
        elapsed = time.monotonic() - start
        owner, _ = attempt(a, wire.policy_get_digest(sa))
    rate = done / elapsed if elapsed else 0.0
    b_part = f"B error {error} at command {done + 1:,}" if error else f"B {done:,} commands ok"
    detail = (f"{b_part} ({k} sessions, {rate:,.0f}/s); A's session then {owner}; "
              f"CONTEXT_GAP_MAX {gap:#x}")
    if error or owner != "rc 0x0":
        return Outcome("fail", detail)
    return Outcome("pass" if done >= n else "figure", detail)


# -- global session exhaustion --------------------------------------------------------------------


EXHAUST_SESSIONS = 70  # libtpms/swtpm: TPM_PT_ACTIVE_SESSIONS_MAX = 64
PER_SPACE = 3  # the kernel's session limit per descriptor (tpm2-abrmd allows 4)


@scenario("exhaustion", kernel_defined=False, in_quick=False, destructive=True)
def exh_sessions_across_spaces(target: Target, quick: bool) -> Outcome:
    """70 policy sessions, 3 per space: where does StartAuthSession fail, and who pays"""
    limit = tpm_property(target, wire.PT_ACTIVE_SESSIONS_MAX)
    conns: list[Conn] = []
    owned: list[tuple[Conn, int]] = []
    first_failure = ""
    waits: list[float] = []
    try:
        while len(owned) < EXHAUST_SESSIONS:
            if len(owned) % PER_SPACE == 0:
                conns.append(target.open())
            start = time.monotonic()
            what, response = attempt(conns[-1], wire.start_auth_session(wire.SE_POLICY))
            waits.append(time.monotonic() - start)
            if response is None or wire.rc(response):
                first_failure = f"session #{len(owned) + 1}: {what} after {waits[-1]:.1f} s"
                break
            owned.append((conns[-1], wire.handle(response)))
        uses = Counter(attempt(c, wire.policy_get_digest(s))[0] for c, s in owned)
    finally:
        for c in conns:
            c.close()
    slow = [w for w in waits if w > 0.3]
    waited = f"; {len(slow)} waited (max {max(slow):.1f} s)" if slow else ""
    result = first_failure or f"{len(owned)}/{EXHAUST_SESSIONS} started"
    used = ", ".join(f"{n}x {what}" for what, n in uses.most_common())
    return Outcome("figure", f"TPM max {limit}; {result}{waited}; then in use: {used}")
