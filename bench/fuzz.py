"""`make fuzz`: a million hostile commands through the FUSE node from several processes.

The node is served in this process (libtpms, the RM, TpmFileOps, the libfuse session) so the
driver can look behind it: a guard wraps the real backend and checks every client command
that reaches the TPM. Client processes (forkserver: clean of this process's threads) each
open the node, make a few real objects and sessions, then send commands from
tests/rm/test_fuzz.py's generators (random, structured, valid, mutated) plus mutations of
traffic captured from a tpm2-tools flow on this very node: bit flips, truncations, lying
size fields, handle areas naming other spaces' virtual handles and guessed session handles,
garbage auth areas, huge counts. Interleaved: reopens, O_NONBLOCK writes never read (the fd
closed with the answer pending), and the driver SIGKILLs clients at random.

Checks, continuously: a probe client's GetRandom is answered within PROBE_BOUND; the guard
counts client commands whose handle or auth area names a transient handle that is not a
physical one (a virtual handle the RM did not map) or a session the running space does not
own (must stay 0); daemon RSS sampled. After each phase (every client gone): the TPM census
equals the RM's tables (no transient object, every session in the TPM is one the RM tracks,
and the other way round). Writes bench/results/fuzz.{json,md}.

Run: python -m bench.fuzz [--commands 1000000] [--clients 4] [--phase 100000]
"""

from __future__ import annotations

import argparse
import contextlib
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
from cusetpm.tpm.constants import TPM_CC, TPM_RS_PW, is_session_handle, is_transient_handle
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
        self.capture: list[bytes] | None = None
        # Sessions a client saved through the TPM (a tagged ContextSave): by design the RM
        # lets go of them (the client holds the blob), so the census may show them.
        self.client_held: dict[int, bytes] = {}

    def transmit(self, command: bytes) -> bytes:
        self._check(command)
        response = self.inner.transmit(command)
        self._note_client_save(command, response)
        return response

    def _note_client_save(self, command: bytes, response: bytes) -> None:
        job = self.rm._current if self.rm is not None else None
        if (job is None or not job.is_command or len(command) < 14 or len(response) < 22
                or int.from_bytes(command[6:10], "big") != TPM_CC.ContextSave
                or int.from_bytes(job.command[6:10], "big") != TPM_CC.ContextSave
                or response[6:10] != bytes(4)):
            return
        saved = int.from_bytes(response[18:22], "big")
        if is_session_handle(saved) and command[10:14] == job.command[10:14]:
            self.client_held[saved] = response[10:]

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
        if self.capture is not None:
            self.capture.append(bytes(command))
        try:
            cmd = parse_command(command, attrs.cHandles)
        except TPMParseError:
            return
        self.checked += 1
        space = job.space
        for h in cmd.handles:
            if is_transient_handle(h) and h >= PHYSICAL_TRANSIENT_END:
                self.violations.append(f"unmapped transient 0x{h:08x}: {command.hex()}")
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


@dataclass
class ClientStats:
    sent: int = 0
    answered: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)


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


def _mutate_captured(rng: random.Random, captured: list[bytes], space: Any) -> bytes:
    base = bytearray(rng.choice(captured))
    how = rng.randrange(8)
    if how == 0:
        base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
    elif how == 1:
        base = base[: rng.randrange(len(base))]
    elif how == 2:
        struct.pack_into(">I", base, 2, rng.choice([0, 9, len(base) + 1, rng.getrandbits(32)]))
    elif how == 3 and len(base) >= 14:  # another space's virtual handle, or a guessed one
        h = rng.choice([0x80FFFFFF - rng.randrange(8), 0x02000000 + rng.randrange(64),
                        0x03000000 + rng.randrange(64)])
        struct.pack_into(">I", base, 10 + 4 * rng.randrange(min(3, (len(base) - 10) // 4)), h)
    elif how == 4 and len(base) >= 18:  # garbage in the auth area (after one handle)
        i = rng.randrange(14, len(base))
        base[i:] = rng.randbytes(len(base) - i)
    elif how == 5 and len(base) >= 14:  # own object or session in the handle slot
        pool = space.objects + space.sessions
        if pool:
            struct.pack_into(">I", base, 10, rng.choice(pool))
    elif how == 6:  # huge counts: a u16/u32 field near the end set to its maximum
        if len(base) >= 14:
            i = rng.randrange(10, len(base) - 3)
            struct.pack_into(">I", base, i, 0xFFFFFFFF)
    else:
        base += rng.randbytes(rng.randint(1, 64))
        struct.pack_into(">I", base, 2, len(base))
    return bytes(base)


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
        stats.refused[e.errno] = stats.refused.get(e.errno, 0) + 1
        if e.errno not in ALLOWED and len(stats.findings) < 20:
            stats.findings.append(f"errno {e.errno} for {command.hex()}")
        return None
    stats.answered += 1
    ok = len(response) >= 10 and wire.size(response) == len(response)
    if not ok and len(stats.findings) < 20:
        stats.findings.append(f"torn response {response.hex()} to {command.hex()}")
    return response


def client(node: str, seed: int, quota: int, captured: list[bytes], progress: Any,
           results: Any) -> None:
    """One client process: `quota` commands over a series of opens."""
    rng = random.Random(seed)
    stats = ClientStats()
    reported = 0
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
            fz.send = lambda _space, command, _what, fd=fd: _send(fd, command, stats)
            for _ in range(rng.randint(20, 3000)):
                r = rng.random()
                if r < 0.25 and captured:
                    _send(fd, _mutate_captured(rng, captured, space), stats)
                elif r < 0.28:
                    _send(fd, _huge(rng), stats)
                else:
                    _one(fz, space)
                if stats.sent - reported >= 200:
                    with progress.get_lock():
                        progress.value += stats.sent - reported
                    reported = stats.sent
        finally:
            os.close(fd)
    with progress.get_lock():
        progress.value += stats.sent - reported
    results.put((seed, stats.sent, stats.answered, stats.refused, stats.findings))


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
    """A well-behaved client beside the fuzzers: GetRandom every PROBE_EVERY seconds."""

    def __init__(self, node: str):
        super().__init__(name="probe", daemon=True)
        self.node = node
        self.stop = threading.Event()
        self.answered = 0
        self.worst = 0.0
        self.failures: list[str] = []

    def run(self) -> None:
        fd = os.open(self.node, os.O_RDWR)
        try:
            while not self.stop.wait(PROBE_EVERY):
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


def capture_tools_flow(node: str, tmp: Path, guard: GuardBackend) -> list[bytes]:
    """Client commands of a tpm2-tools flow on the node, as they reached the TPM."""
    guard.capture = []
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
    for step in steps:
        if shutil.which(step[0]) is not None:
            subprocess.run(step, capture_output=True, timeout=60, check=False)
    captured, guard.capture = guard.capture, None
    return captured


def census_matches(rm: Any, guard: GuardBackend) -> tuple[bool, str]:
    """Nothing loaded; every session in the TPM tracked by the RM, or saved by a client
    through the TPM (its blob is the client's); every session the RM tracks in the TPM."""
    census = rm.tpm_census()
    # The TPM lists sessions by slot (0x02xxxxxx), HMAC and policy alike: compare slots.
    tracked = {entry.handle & 0xFFFFFF for entry in rm.sessions}
    in_tpm = {h & 0xFFFFFF for h in census["loaded_sessions"] + census["saved_sessions"]}
    held = {h & 0xFFFFFF for h in guard.client_held}
    untracked = in_tpm - tracked - held
    ok = census["transient"] == [] and census["loaded_sessions"] == [] and not untracked \
        and tracked <= in_tpm
    return ok, f"census {census}, RM tracks {sorted(tracked)}, untracked {sorted(untracked)}"


def drop_client_held(rm: Any, guard: GuardBackend) -> None:
    """Load (and so flush, at close) the sessions clients saved through the TPM and left."""
    from cusetpm.rm import RMError
    from cusetpm.tpm import commands as build

    for blob in list(guard.client_held.values()):
        space = rm.open_space()
        with contextlib.suppress(RMError):  # stale (loaded back by its client): fine
            rm.transmit(space, build.context_load_raw(blob))
        rm.close_space(space)
    guard.client_held.clear()


def run(total: int, clients: int, phase: int, seed: int) -> dict[str, Any]:
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
    rm = ResourceManager(guard, RMConfig(max_objects=8, max_sessions=4))
    rm.start()
    guard.rm = rm
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
    started = time.monotonic()
    try:
        captured = capture_tools_flow(node, tmp, guard)
        probe = Probe(node)
        probe.start()
        serial = 0
        while sent < total:
            progress = ctx.Value("q", 0)
            results = ctx.Queue()
            quota = max(1, phase // clients)
            t0 = time.monotonic()

            def spawn(quota: int = quota, progress: Any = progress,
                      results: Any = results) -> Any:
                nonlocal serial
                serial += 1
                p = ctx.Process(target=client, args=(node, seed * 1000 + serial, quota,
                                                     captured, progress, results))
                p.start()
                return p

            procs = [spawn() for _ in range(clients)]
            while progress.value < phase:
                time.sleep(0.5)
                rss.append(rss_kib())
                alive = [p for p in procs if p.is_alive()]
                if rng.random() < 0.3 and alive:  # SIGKILL a client mid-work
                    victim = rng.choice(alive)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed += 1
                living = [p for p in procs if p.is_alive()]
                if len(living) < clients:
                    procs = living + [spawn() for _ in range(clients - len(living))]
            for p in procs:
                os.kill(p.pid, signal.SIGKILL) if p.is_alive() else None
                p.join()
            while not results.empty():
                _, _, _, ref, found = results.get()
                for k, v in ref.items():
                    refused[k] = refused.get(k, 0) + v
                findings.extend(found)
            done = progress.value
            sent += done
            # every client is gone: let the RM finish closing their spaces, then compare
            for _ in range(100):
                if rm.open_spaces <= 1:  # the probe's
                    break
                time.sleep(0.05)
            ok, text = census_matches(rm, guard)
            if not ok:
                findings.append(f"after phase {len(phases) + 1}: {text}")
            drop_client_held(rm, guard)
            phases.append({"commands": done, "seconds": round(time.monotonic() - t0, 1),
                           "census_ok": ok, "rss_kib": rss_kib()})
            print(f"fuzz: phase {len(phases)}: {done} commands in {phases[-1]['seconds']} s, "
                  f"census {'ok' if ok else 'MISMATCH'}, rss {rss[-1]} KiB, {killed} killed, "
                  f"probe worst {probe.worst:.3f} s", flush=True)
        probe.stop.set()
        probe.join()
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
        "seed": seed, "clients": clients, "commands": sent, "seconds": round(elapsed, 1),
        "commands_per_s": round(sent / elapsed), "clients_killed": killed,
        "captured_tools_commands": len(captured),
        "guard_checked": guard.checked, "guard_violations": len(guard.violations),
        "probe_answered": probe.answered, "probe_worst_s": round(probe.worst, 3),
        "probe_bound_s": PROBE_BOUND, "rss_start_kib": rss[0], "rss_max_kib": max(rss),
        "rss_end_kib": rss[-1], "rss_bound_kib": RSS_BOUND_KIB,
        "refused_errnos": {errno.errorcode.get(k, str(k)): v for k, v in sorted(refused.items())},
        "phases": phases, "findings": findings,
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"# make fuzz: {r['commands']:,} hostile commands through the FUSE node",
        "",
        f"{r['date']}, {r['machine']}. Seed {r['seed']}, {r['clients']} client processes.",
        "",
        f"- {r['commands']:,} commands in {r['seconds']} s: **{r['commands_per_s']:,} commands/s**",
        f"- clients SIGKILLed mid-work: {r['clients_killed']}",
        f"- tpm2-tools commands captured and mutated: {r['captured_tools_commands']}",
        f"- client commands checked at the backend: {r['guard_checked']:,}; naming another "
        f"space's handle or an unmapped virtual handle: **{r['guard_violations']}**",
        f"- probe client: {r['probe_answered']} GetRandoms, slowest {r['probe_worst_s']} s "
        f"(bound {r['probe_bound_s']} s)",
        f"- daemon RSS: {r['rss_start_kib']} KiB at start, {r['rss_max_kib']} KiB at most, "
        f"{r['rss_end_kib']} KiB at the end (bound {r['rss_bound_kib']} KiB)",
        f"- errnos earned: {r['refused_errnos']}",
        f"- census after each of {len(r['phases'])} phases equals the RM's tables: "
        f"{all(p['census_ok'] for p in r['phases'])}",
        f"- findings: {len(r['findings'])}",
        "",
    ]
    lines += [f"  - `{f[:300]}`" for f in r["findings"]]
    lines += ["", "| phase | commands | seconds | census ok | RSS KiB |",
              "|---:|---:|---:|:-:|---:|"]
    lines += [f"| {i + 1} | {p['commands']} | {p['seconds']} | {p['census_ok']} | {p['rss_kib']} |"
              for i, p in enumerate(r["phases"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0xF022)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import logging

    # The RM logs every refusal at WARNING: a million of them would drown the report.
    logging.basicConfig(level=logging.ERROR)
    result = run(args.commands, args.clients, min(args.phase, args.commands), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(report(result))
    print(report(result))
    return 0 if not result["findings"] else 1


if __name__ == "__main__":
    sys.exit(main())
