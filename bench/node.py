"""Commands through the node (`cusetpm serve --fuse-mount`) vs. the RM in process vs. libtpms.

The daemon runs as its own process, the client is this one: what a real client pays for
the file round trips (FUSE here; CUSE takes the same path through fs/fuse in the kernel).
The same workloads and command bytes as the `rm` section, in alternating rounds within
one run, so the ratios hold even when the machine's speed drifts: the node's overhead is
taken per round (node µs/command minus the RM's in the same round), then the median.
"daemon CPU" is the daemon process's user+system time per command (/proc): what the node
costs the machine, independent of how the scheduler places client and daemon. Needs root
and /dev/fuse (the FUSE mount); otherwise the section says why and reports nothing.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.workloads import WORKLOADS, Transmit, rate
from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.rm import ResourceManager
from cusetpm.tpm import commands as build

TITLE = "Through the node (FUSE mount) vs. the RM in process vs. libtpms alone"

CLIENT = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
cmd = bytes.fromhex(sys.argv[2])
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    for _ in range(16):
        os.write(fd, cmd)
        os.read(fd, 4096)
    n += 16
print(n)
"""


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mount with allow_other)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3"
    return None


@contextmanager
def _daemon(tmp: Path, extra: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """A `cusetpm serve --fuse-mount` subprocess; yields the node's path and the pid."""
    mount = tmp / "mnt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cusetpm", "serve", "--fuse-mount", str(mount),
         "--state-dir", str(tmp / "node-state"), "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("cusetpm: serving"):
            raise RuntimeError(f"the daemon did not start: {line!r}")
        yield str(mount / "tpmrm0"), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _cpu_seconds(pid: int) -> float:
    """user + system time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(transmit: Transmit, command: bytes, seconds: float) -> float:
    return rate(transmit, command, seconds)[0]


def _fd_transmit(fd: int) -> Transmit:
    def transmit(command: bytes) -> bytes:
        os.write(fd, command)
        return os.read(fd, 4096)

    return transmit


def _poll_transmit(fd: int) -> Transmit:
    """tpm2-tss's way: O_NONBLOCK write, poll for POLLIN, read."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def transmit(command: bytes) -> bytes:
        os.write(fd, command)
        poller.poll(5000)
        return os.read(fd, 4096)

    return transmit


def _through_node(node: str, flags: int, wrap: Callable[[int], Transmit],
                  setup: Callable[[Transmit], bytes], seconds: float) -> tuple[float, int]:
    fd = os.open(node, os.O_RDWR | flags)
    try:
        transmit = wrap(fd)
        return rate(transmit, setup(transmit), seconds)
    finally:
        os.close(fd)


def _in_process(rm: ResourceManager, setup: Callable[[Transmit], bytes], seconds: float) -> float:
    space = rm.open_space()
    try:
        send: Transmit = lambda cmd: rm.transmit(space, cmd)  # noqa: E731
        return _rate(send, setup(send), seconds)
    finally:
        rm.close_space(space)


def _workload_rows(node: str, daemon_pid: int, rm: ResourceManager, backend: LibtpmsBackend,
                   seconds: float, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        samples = []
        cpu, commands = 0.0, 0
        for _ in range(rounds):
            cpu -= _cpu_seconds(daemon_pid)
            blocking, sent = _through_node(node, 0, _fd_transmit, workload.setup, seconds)
            cpu += _cpu_seconds(daemon_pid)
            commands += sent
            polled, _ = _through_node(
                node, os.O_NONBLOCK, _poll_transmit, workload.setup, seconds
            )
            managed = _in_process(rm, workload.setup, seconds)
            samples.append((blocking, polled, managed))
        blocking, polled, managed = (statistics.median(s[i] for s in samples) for i in range(3))
        overhead = statistics.median(1e6 / s[0] - 1e6 / s[2] for s in samples)
        rows.append({
            "workload": workload.name,
            "node write/read cmds/s": round(blocking),
            "node us/cmd": round(1e6 / blocking, 1),
            "node write/poll/read cmds/s": round(polled),
            "RM in process cmds/s": round(managed),
            "RM us/cmd": round(1e6 / managed, 1),
            "node/RM": f"{blocking / managed:.3f}",
            "node overhead us/cmd": round(overhead, 1),
            "daemon CPU us/cmd": round(1e6 * cpu / commands, 1),
        })
    direct = statistics.median(
        _rate(backend.transmit, build.get_random(16), seconds) for _ in range(rounds)
    )
    rows.append({"workload": "GetRandom, libtpms alone (the limit)",
                 "RM in process cmds/s": round(direct)})
    return rows


def _parallel_row(node: str, clients: int, seconds: float) -> dict[str, Any]:
    command = build.get_random(16).hex()
    procs = [
        subprocess.Popen([sys.executable, "-c", CLIENT, node, command, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(clients)
    ]
    counts = [int(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    return {"workload": f"GetRandom, {clients} client processes at once",
            "node write/read cmds/s": round(sum(counts) / seconds)}


def _pytss_row(node: str, seconds: float) -> dict[str, Any] | None:
    try:
        from tpm2_pytss import ESAPI, TCTILdr
    except ImportError:
        return None
    with ESAPI(TCTILdr("device", node)) as esys:
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            esys.get_random(16)
            n += 1
        rate = n / (time.perf_counter() - start)
    return {"workload": "GetRandom, tpm2-pytss ESAPI (device TCTI)",
            "node write/poll/read cmds/s": round(rate)}


def run(quick: bool) -> list[dict[str, Any]]:
    reason = _unavailable()
    if reason is not None:
        return [{"workload": f"skipped: {reason}"}]
    # Short rounds, many of them: the machine's speed drifts less within a round.
    seconds, rounds = (0.2, 2) if quick else (0.5, 6)
    with tempfile.TemporaryDirectory(prefix="cusetpm-bench-node-") as tmp_name:
        tmp = Path(tmp_name)
        backend = LibtpmsBackend(tmp / "rm-state")
        rm = ResourceManager(backend)
        rm.start()
        try:
            with _daemon(tmp) as (node, daemon_pid):
                rows = _workload_rows(node, daemon_pid, rm, backend, seconds, rounds)
                pytss = _pytss_row(node, seconds)
                if pytss is not None:
                    rows.append(pytss)
                rows.append(_parallel_row(node, 8, seconds * 2))
        finally:
            rm.stop()
            backend.close()
    return rows
